"""The distillation loop: a fixed global batch per step split over processes, periodic checkpoints, resume."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvconvert.heal import checkpointing
from kvconvert.heal.data import window_order
from kvconvert.heal.objective import Objective
from kvconvert.heal.trainable import trainable_parameters
from kvconvert.progress import Progress, Silent


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    """Windows per process per step; the global batch is this times the number of processes."""
    lr: float = 3e-4
    warmup: float = 0.05
    """Share of the steps with linear warm-up; cosine decay to zero after it."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50


@dataclass(frozen=True)
class StepInfo:
    step: int
    """Steps done so far (1-based after the first update)."""
    steps: int
    tokens: int
    """Training tokens seen so far, over all processes."""
    loss: float
    parts: dict[str, float] = field(default_factory=dict)
    tokens_per_s: float = 0.0


@dataclass(frozen=True)
class TrainResult:
    model: torch.nn.Module
    steps: int
    tokens: int
    resumed_from: int
    final_loss: float | None
    seconds: float


def train(
    student,
    teacher,
    windows: torch.Tensor,
    objective: Objective,
    cfg: TrainConfig,
    accelerator,
    *,
    state_dir: Path,
    settings: dict,
    resume: bool = False,
    progress: Progress | None = None,
    on_step: Callable[[StepInfo, torch.nn.Module], None] | None = None,
) -> TrainResult:
    """Train `student` (trainable parameters already chosen) to match `teacher` on `windows`; return it unwrapped.

    `settings` identify the run: a resumed run must pass the same. `on_step(info, model)` runs after every step.
    """
    from transformers import get_cosine_schedule_with_warmup

    progress = (progress or Silent()) if accelerator.is_main_process else Silent()
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch, seq_len = cfg.batch_size * world, windows.shape[1]
    params = trainable_parameters(student)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    # The scheduler stays outside `prepare`: accelerate would step it once per process.
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(cfg.warmup * cfg.steps), cfg.steps)
    student, optimizer = accelerator.prepare(student, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    if teacher is not None:
        teacher.requires_grad_(False).eval().to(accelerator.device)
    start = checkpointing.load_state(accelerator, state_dir, settings) if resume else 0

    advance = progress.task("healing the student (tokens)", cfg.steps * global_batch * seq_len)
    advance(start * global_batch * seq_len)
    student.train()
    t0, loss_value = time.perf_counter(), None
    for step in range(start, cfg.steps):
        order = window_order(len(windows), step, global_batch, cfg.seed)
        batch = windows[order[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]].to(accelerator.device)
        teacher_logits = None
        if objective.needs_teacher:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch, use_cache=False).logits
        with accelerator.autocast():
            logits = student(input_ids=batch, use_cache=False).logits
        loss, parts = objective(logits, teacher_logits, batch)
        accelerator.backward(loss)
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        del logits, teacher_logits
        loss_value = float(accelerator.reduce(loss.detach(), "mean"))
        done = step + 1
        if done % cfg.checkpoint_every == 0 and done < cfg.steps:
            checkpointing.save_state(accelerator, state_dir, done, settings)
        elapsed = time.perf_counter() - t0
        rate = (done - start) * global_batch * seq_len / elapsed
        info = StepInfo(done, cfg.steps, done * global_batch * seq_len, loss_value, parts, rate)
        advance(global_batch * seq_len, info=f"loss {loss_value:.4f}  {info.tokens_per_s:,.0f} tok/s")
        if on_step is not None:
            on_step(info, accelerator.unwrap_model(student))
    student.eval()
    accelerator.wait_for_everyone()
    return TrainResult(
        accelerator.unwrap_model(student, keep_fp32_wrapper=False),  # plain forward again, no autocast wrapper
        cfg.steps,
        cfg.steps * global_batch * seq_len,
        start,
        loss_value,
        time.perf_counter() - t0,
    )
