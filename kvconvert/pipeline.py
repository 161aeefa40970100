"""The calibrate -> decompose -> export -> verify pipeline behind `kvconvert compress`, with stage timings."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kvconvert.calibrate import calibrate, calibration_windows
from kvconvert.card import CARD, model_card
from kvconvert.checkpoint import Checkpoint
from kvconvert.config import CalibrateConfig, CompressRequest, RefineConfig
from kvconvert.converted import Converted
from kvconvert.decompose import decompose
from kvconvert.distributed import Part
from kvconvert.errors import KVConvertError
from kvconvert.export import layers_in_write_order, prepare_output, write_checkpoint
from kvconvert.heal import HealResult, run_heal
from kvconvert.io.staging import check_output_first, scratch_dir
from kvconvert.merge.rope import pair_coherence
from kvconvert.modeling import resolve_device, resolve_dtype
from kvconvert.overlap import OnLayer, PendingPlan
from kvconvert.plan import CompressionPlan, LayerPlan
from kvconvert.preflight import check_source
from kvconvert.progress import Progress, Silent
from kvconvert.razor.store import protected_heads
from kvconvert.record import RECORD, Record, dump_record, new_record
from kvconvert.refine import refine
from kvconvert.sources import read_provenance
from kvconvert.stats import CalibrationStats
from kvconvert.targets import parse_heads
from kvconvert.textdata import SELF, describe, windows_digest
from kvconvert.verify import VerifyResult, converted_in_memory, verify, verify_streamed

CalibrationRequest = CalibrateConfig
"""Former name of the calibration config."""
RefineRequest = RefineConfig
"""Former name of the refinement config."""


@dataclass
class CompressResult:
    output: Path
    plan: CompressionPlan
    timings: dict[str, float]
    verify: VerifyResult | None
    heal: HealResult | None = None


def _device_dtype(req: CalibrateConfig) -> tuple[torch.device, torch.dtype]:
    device = resolve_device(req.device)
    return device, resolve_dtype(req.dtype, device)


def run_calibration(
    ckpt: Checkpoint,
    req: CalibrateConfig,
    output: Path,
    progress: Progress | None = None,
    part: Part | None = None,
    windows: torch.Tensor | None = None,
    timings: dict[str, float] | None = None,
) -> CalibrationStats | None:
    """Calibrate `ckpt` per `req` into the stats file `output` (main process returns the loaded stats); `timings`
    receives the seconds of its parts (`calibrate.calibrate`)."""
    return calibrate(
        ckpt, output, req, *_device_dtype(req), part=part, progress=progress, windows=windows, timings=timings
    )


def request_windows(ckpt: Checkpoint, req: CalibrateConfig, progress: Progress | None = None) -> torch.Tensor:
    """The token windows `req` describes (text or samples from the model)."""
    return calibration_windows(ckpt, req, *_device_dtype(req), progress=progress)


def stats_windows(ckpt: Checkpoint, stats: CalibrationStats, device: str, progress: Progress | None = None):
    """Rebuild the exact windows a stats file was calibrated on (from its recorded source), checked by hash."""
    src = stats.source
    req = CalibrateConfig(
        dataset=src["dataset"],
        samples=src["samples"],
        seq_len=src["seq_len"],
        batch_size=src.get("batch_size", 1),  # `self` samples depend on it (recorded since; 1 is the default)
        seed=src.get("seed", 0),
        text_field=src.get("text_field"),
        device=device,
        dtype=src.get("dtype", "float32"),
    )
    windows = request_windows(ckpt, req, progress)
    if windows_digest(windows) != src.get("tokens_sha256"):
        if src["dataset"] == SELF:
            here, there = resolve_device(device).type, src.get("device", "another device")
            raise KVConvertError(
                f"the stats' windows were sampled from the model (--dataset self) on {there}; sampling again on "
                f"{here} gave other tokens (samples depend on the device, dtype and batch size): refine on {there}, "
                "recalibrate here, or calibrate on a text dataset"
            )
        raise KVConvertError(
            f"the calibration text {src['dataset']} no longer gives the windows the stats were computed on; "
            "recalibrate or drop --stats"
        )
    return windows


ROPE_HORIZON = 4096
"""Context (tokens) over which a constant pre-RoPE key offset counts as a harmless softmax shift (see
`merge.rope.pair_coherence`); 4096 measured best among 512-32768 on SmolLM2 (docs/method.md)."""


def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def plan_compression(
    ckpt: Checkpoint,
    stats: CalibrationStats,
    n_new: int,
    method: str,
    grouping: str,
    device: torch.device,
    progress: Progress | None = None,
    protected: list[list[int]] | None = None,
    on_layer: OnLayer | None = None,
    order: list[int] | None = None,
) -> CompressionPlan:
    """Decompose every layer (in `order`, each finished one also handed to `on_layer`), with a progress bar."""
    geom = ckpt.family.geometry(ckpt.config)
    coherence = pair_coherence(rope_theta(ckpt.config), geom.rotary_dim, ROPE_HORIZON)
    advance = (progress or Silent()).task("decomposing", geom.num_layers)

    def finished(layer: int, plan: LayerPlan) -> None:
        if on_layer is not None:
            on_layer(layer, plan)
        advance()

    return decompose(
        stats.moments,
        ckpt.attention,
        geom,
        n_new,
        method,
        grouping,
        coherence=coherence,
        device=device if device.type == "cuda" else "cpu",
        on_layer=finished,
        protected=protected,
        order=order,
    )


def run_compress(req: CompressRequest, progress: Progress | None = None) -> CompressResult:
    progress = progress or Silent()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    check_output_first(req.output, req.model, overwrite=req.overwrite, directory=True)
    ckpt = req.resolve(progress)
    geom = ckpt.family.geometry(ckpt.config)
    n_new = parse_heads(req.heads, geom)
    prepare_output(req.output, ckpt.path, req.overwrite)
    check_source(ckpt, require_tokenizer=not req.allow_missing_tokenizer)
    protected = protected_heads(req.protect_retrieval, geom, n_new, req.grouping) if req.protect_retrieval else None
    timings["load"] = time.perf_counter() - t0

    with scratch_dir(_existing_parent(req.output), ".kvconvert-stats-") as tmp:
        t0 = time.perf_counter()
        windows = None
        if req.stats is not None:
            stats = CalibrationStats.load(req.stats)
            stats.check_model(ckpt.fingerprint(), req.stats)
            if req.refine.steps:
                windows = stats_windows(ckpt, stats, req.calibration.device, progress)
        else:
            windows = request_windows(ckpt, req.calibration, progress)
            stats = run_calibration(ckpt, req.calibration, Path(tmp) / "stats.safetensors", progress, windows=windows)
        timings["calibrate"] = time.perf_counter() - t0
        return _compress_with_stats(req, ckpt, stats, windows, n_new, timings, progress, Path(tmp), protected)


def _existing_parent(path: Path) -> Path:
    parent = path.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return parent


def _compress_with_stats(
    req: CompressRequest,
    ckpt: Checkpoint,
    stats: CalibrationStats,
    windows: torch.Tensor | None,
    n_new: int,
    timings: dict[str, float],
    progress: Progress,
    scratch: Path,
    protected: list[list[int]] | None = None,
) -> CompressResult:
    device = resolve_device(req.calibration.device)

    def planner(on_layer: OnLayer | None = None, order: list[int] | None = None) -> CompressionPlan:
        return plan_compression(
            ckpt, stats, n_new, req.method, req.grouping, device, progress, protected, on_layer, order
        )

    if req.refine.steps:  # refinement needs the whole plan first; then the export writes its layers
        t0 = time.perf_counter()
        plan = planner()
        timings["decompose"] = time.perf_counter() - t0
        conv, record = _refined(
            req,
            Converted(ckpt, plan),
            conversion_record(ckpt, plan, stats),
            windows,
            device,
            progress,
            scratch,
            timings,
        )
        result = _export(req, conv, record, device, progress, timings, "export")
    else:  # the export streams the checkpoint while decompose plans layers in the order it writes them
        order = layers_in_write_order(ckpt, n_new, req.max_shard_size)
        with PendingPlan(lambda on_layer: planner(on_layer, order), len(order), n_new) as pending:
            record = lambda: conversion_record(ckpt, pending.result(), stats)  # noqa: E731  (after the weights)
            result = _export(req, Converted(ckpt, pending), record, device, progress, timings, "decompose+export")
            plan = pending.result()
    healed = None
    if req.heal is not None:
        t0 = time.perf_counter()
        healed = run_heal(req.heal, progress)
        timings["heal"] = time.perf_counter() - t0
    return CompressResult(req.output, plan, timings, result, healed)


def _refined(
    req: CompressRequest,
    conv: Converted,
    record: Record,
    windows: torch.Tensor,
    device: torch.device,
    progress: Progress,
    scratch: Path,
    timings: dict[str, float],
) -> tuple[Converted, Record]:
    """The conversion with refined attention weights, and its record with a `refine` section."""
    t0 = time.perf_counter()
    r = req.refine
    dtype = resolve_dtype(req.calibration.dtype, device)
    conv, layers = refine(
        conv, windows[: r.samples], r, scratch / "refined", device, dtype, req.calibration.offload_dir, progress
    )
    refined = {
        **r.model_dump(include={"steps", "lr"}),
        "batch_size": r.batch_size,
        "inputs": r.inputs,
        "samples": min(r.samples, len(windows)),
        "layers": layers,
    }
    timings["refine"] = time.perf_counter() - t0
    return conv, record.with_sections(refine=refined)


def _export(
    req: CompressRequest,
    conv: Converted,
    record: Record | Callable[[], Record],
    device: torch.device,
    progress: Progress,
    timings: dict[str, float],
    stage: str,
) -> VerifyResult | None:
    """Write `conv` to the output (timed as `stage`), verifying the staged files first unless asked not to.
    `record` may be a function, called once the weights are written (when the plan was still pending)."""
    t0 = time.perf_counter()
    checked: list[VerifyResult] = []

    def extra() -> dict[str, str]:
        rec = record() if callable(record) else record
        return {RECORD: dump_record(rec), CARD: model_card(rec)}

    def check(staged: Path) -> None:
        """Verify the staged output before it replaces anything: a refused run leaves the old output as it was."""
        timings[stage] = time.perf_counter() - t0
        t1 = time.perf_counter()
        final = Converted(conv.ckpt, _whole(conv.plan), conv.overrides)
        result = verify_streamed(staged, final, device) if req.verify else None
        if req.reload_check and (result is None or result.ok):  # asked for by itself, it runs by itself
            result = verify(staged, converted_in_memory(final), trust_remote_code=conv.ckpt.trust_remote_code)
        timings["verify"] = time.perf_counter() - t1
        if not result.ok:
            raise KVConvertError(
                f"written output differs from the in-memory conversion (max |Δlogit| {result.max_abs_diff:.3g}); "
                "nothing was replaced; please report this"
            )
        checked.append(result)

    write_checkpoint(
        conv,
        req.output,
        extra_files=extra,
        max_shard_size=req.max_shard_size,
        overwrite=req.overwrite,
        progress=progress,
        check=check if req.verify or req.reload_check else None,
    )
    timings.setdefault(stage, time.perf_counter() - t0)
    return checked[0] if checked else None


def _whole(plan: CompressionPlan | PendingPlan) -> CompressionPlan:
    return plan.result() if isinstance(plan, PendingPlan) else plan


def conversion_record(ckpt: Checkpoint, plan: CompressionPlan, stats: CalibrationStats) -> Record:
    """What kvconvert.json records: source, license, KV-cache sizes, calibration, and the plan (groups, retained
    energy per layer). No timestamps or machine details: the same inputs give the same bytes."""
    geom = ckpt.family.geometry(ckpt.config)
    n_new = plan.num_kv_heads_after
    key = ckpt.family.tensor_name(0, "k", "weight")
    dtype = ckpt.tensors.dtype(key if key in ckpt.tensors else next(iter(ckpt.tensors.names())))
    context = getattr(ckpt.config, "max_position_embeddings", None)
    at_context = None
    if context:
        from kvconvert.evaluation.kvcache import kv_cache_bytes

        converted = Converted(ckpt, plan).config
        at_context = {
            "before": kv_cache_bytes(ckpt.config, dtype.itemsize, context),
            "after": kv_cache_bytes(converted, dtype.itemsize, context),
        }
    return new_record(
        **{
            "name": (ckpt.base_model or "").rsplit("/", 1)[-1] or Path(ckpt.spec).name or ckpt.spec,
            "source": ckpt.spec,
            "base_model": ckpt.base_model,
            "license": ckpt.license.get("license"),
            **{k: v for k, v in ckpt.license.items() if k != "license"},
            "dtype": str(dtype).removeprefix("torch."),
            "gguf_source": read_provenance(ckpt.path),
            "kv_cache": {
                "dtype": str(dtype).removeprefix("torch."),
                "dtype_bytes": dtype.itemsize,
                "bytes_per_token": {
                    "before": geom.kv_bytes_per_token(dtype.itemsize),
                    "after": geom.with_kv_heads(n_new).kv_bytes_per_token(dtype.itemsize),
                },
                "context_length": context,
                "bytes_at_context": at_context,
            },
            "fingerprint": stats.fingerprint,
            "calibration": {
                **stats.source,
                "data": describe(stats.source.get("dataset", "")),
                "tokens": stats.n_tokens,
            },
            **plan.summary(),
        }
    )
