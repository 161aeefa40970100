"""`kvconvert heal`: distil a converted (student) model from its original (teacher) and write a stock checkpoint."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kvconvert import __version__
from kvconvert.checkpoint import Checkpoint, resolve
from kvconvert.config import HealRequest
from kvconvert.errors import KVConvertError
from kvconvert.heal import checkpointing
from kvconvert.heal.data import build_windows
from kvconvert.heal.loop import StepInfo, TrainConfig, train
from kvconvert.heal.objective import Objective
from kvconvert.heal.trainable import merged, select_trainable
from kvconvert.heal.write import student_tensors, write_healed
from kvconvert.modeling import resolve_device, resolve_dtype
from kvconvert.progress import Progress, Silent
from kvconvert.record import Record, new_record, read_record
from kvconvert.textdata import windows_digest
from kvconvert.verify import VerifyResult, verify


@dataclass(frozen=True)
class HealResult:
    output: Path
    record: Record
    verify: VerifyResult | None
    seconds: float = 0.0


def plan_steps(req: HealRequest, processes: int) -> int:
    """Optimizer steps: --steps, else enough global batches to cover --tokens."""
    if req.steps is not None:
        return req.steps
    if not req.tokens:
        raise KVConvertError("give --tokens N or --steps N")
    return max(1, math.ceil(req.tokens / (req.batch_size * processes * req.seq_len)))


def check_request(req: HealRequest, teacher: Checkpoint, student: Checkpoint) -> None:
    """What the config cannot check alone: the output against the teacher and student, and their match."""
    out = req.output.resolve()
    if out == teacher.path or teacher.path in out.parents or out in teacher.path.parents:
        raise KVConvertError(f"output {req.output} overlaps the teacher {teacher.path}; choose a separate directory")
    if out != student.path and req.output.is_dir() and any(req.output.iterdir()) and not req.overwrite:
        raise KVConvertError(f"output directory {req.output} is not empty; pass --overwrite or choose another path")
    if out == student.path and not req.overwrite:
        raise KVConvertError("output is the student itself; pass --overwrite to replace it with the healed model")
    if teacher.config.vocab_size != student.config.vocab_size or teacher.family != student.family:
        raise KVConvertError(
            f"teacher {teacher.spec} and student {student.spec} differ in family or vocabulary; "
            "pass the model the student was converted from"
        )


def on_device_index(device: torch.device) -> contextlib.AbstractContextManager:
    """`--device cuda:N` in one process: accelerate places everything on "cuda", the current CUDA device, which is
    cuda:0 unless set; inside this context it is N. Other devices, and several processes (each has its own GPU):
    nothing to do."""
    if device.type == "cuda" and device.index is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return torch.cuda.device(device.index)
    return contextlib.nullcontext()


def run_heal(
    req: HealRequest,
    progress: Progress | None = None,
    on_step: Callable[[StepInfo, torch.nn.Module], None] | None = None,
) -> HealResult | None:
    """Heal `req.student` towards `req.teacher` and write it to `req.output` (returns None on non-main processes)."""
    device = resolve_device(req.device)
    with on_device_index(device):
        return _run_heal(req, device, progress, on_step)


def _run_heal(
    req: HealRequest,
    device: torch.device,
    progress: Progress | None,
    on_step: Callable[[StepInfo, torch.nn.Module], None] | None,
) -> HealResult | None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress = progress or Silent()
    t_start = time.perf_counter()
    student_ckpt = resolve(req.student, allow_pickle=req.allow_pickle, progress=progress)
    teacher_ckpt = resolve(req.teacher, revision=req.teacher_revision, allow_pickle=req.allow_pickle, progress=progress)
    check_request(req, teacher_ckpt, student_ckpt)
    dtype = resolve_dtype(req.dtype, device)
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # accelerate keeps one process-wide state; a run in a single process starts from a fresh one, so a
        # library user can heal twice with different precisions.
        AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=precision)
    steps = plan_steps(req, accelerator.num_processes)
    global_batch = req.batch_size * accelerator.num_processes
    state_dir = req.state_dir or checkpointing.default_state_dir(req.output)
    if not req.resume and accelerator.is_main_process:
        checkpointing.start_fresh(state_dir, req.overwrite)

    objective = Objective(req.kl_weight, req.ce_weight, req.temperature)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_ckpt.path, dtype=dtype)
    teacher.requires_grad_(False).eval().to(accelerator.device)
    if not req.resume and accelerator.is_main_process:
        tokenizer = AutoTokenizer.from_pretrained(teacher_ckpt.path)
        windows, sources = build_windows(
            teacher,
            tokenizer,
            req.datasets,
            steps * global_batch,
            req.seq_len,
            seed=req.seed,
            text_field=req.text_field,
            progress=progress,
        )
        checkpointing.save_windows(state_dir, windows, sources)
    accelerator.wait_for_everyone()
    windows, sources = checkpointing.load_windows(state_dir)

    student = AutoModelForCausalLM.from_pretrained(student_ckpt.path, dtype=torch.float32)
    student = select_trainable(student, student_ckpt.family, req.train, req.lora_rank, req.seed)
    cfg = TrainConfig(steps=steps, **req.model_dump(include={"batch_size", "lr", "warmup", "seed", "checkpoint_every"}))
    settings = json.loads(
        json.dumps(
            {
                **asdict(cfg),
                **asdict(objective),
                "train": req.train,
                "lora_rank": req.lora_rank if req.train == "lora" else None,
                "processes": accelerator.num_processes,
                "seq_len": req.seq_len,  # the saved windows fix it; another --seq-len would only mislabel them
                "mixed_precision": precision,
                "windows_sha256": windows_digest(windows),
                "student": str(student_ckpt.path),
                "teacher": str(teacher_ckpt.path),
            }
        )
    )
    del settings["checkpoint_every"]
    result = train(
        student,
        teacher if objective.needs_teacher else None,
        windows,
        objective,
        cfg,
        accelerator,
        state_dir=state_dir,
        settings=settings,
        resume=req.resume,
        progress=progress,
        on_step=on_step,
    )
    del teacher
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return None

    model = merged(result.model)
    tensors = student_tensors(model, student_ckpt)
    record = heal_record(student_ckpt, req, settings, sources, result)
    checked: list = []

    def check(staged: Path) -> None:  # before the healed output replaces anything
        model.load_state_dict(tensors, strict=False)  # the written (possibly lower-precision) values
        checked.append(verify(staged, model))
        if not checked[0].ok:
            raise KVConvertError(
                f"reloaded healed output differs from the trained model (max |Δlogit| {checked[0].max_abs_diff:.3g}); "
                "nothing was replaced; please report this"
            )

    size = req.max_shard_size
    write_healed(tensors, student_ckpt, req.output, record, max_shard_size=size, check=check if req.verify else None)
    verified = checked[0] if checked else None
    if not req.keep_state:
        shutil.rmtree(state_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    return HealResult(req.output, record, verified, time.perf_counter() - t_start)


STUDENT_ONLY = ("evaluation", "hub", "matryoshka")
"""Sections of the student's kvconvert.json that a healed output does not inherit."""


def heal_record(student: Checkpoint, req: HealRequest, settings: dict, sources, result) -> Record:
    """The student's kvconvert.json (if any) plus a `heal` entry describing this run (no timings: the same inputs
    give the same bytes)."""
    # the student's perplexity, its Hub upload and its MatryoshkaKV projections (a file heal does not carry over)
    # describe the student, not the healed weights
    record = (read_record(student.path) or new_record()).without(*STUDENT_ONLY)
    return record.with_sections(
        heal={
            "kvconvert_version": __version__,
            "teacher": req.teacher,
            "data": sources,
            "tokens": result.tokens,
            "steps": result.steps,
            "global_batch_size": req.batch_size * settings["processes"],
            "seq_len": req.seq_len,
            "train": req.train,
            **({"lora_rank": req.lora_rank} if req.train == "lora" else {}),
            "lr": req.lr,
            "warmup": req.warmup,
            "kl_weight": req.kl_weight,
            "ce_weight": req.ce_weight,
            "temperature": req.temperature,
            "processes": settings["processes"],
            "seed": req.seed,
            "windows_sha256": settings["windows_sha256"],
            "final_loss": result.final_loss,
            "resumed_from_step": result.resumed_from or None,
        }
    )
