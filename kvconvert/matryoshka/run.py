"""`kvconvert matryoshka`: post-RoPE KV moments -> PCA bases -> Matryoshka training -> rate search -> output.

The output directory holds the unchanged model files, `matryoshka.safetensors` (bases and rates) and a `matryoshka`
section in `kvconvert.json`.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kvconvert import __version__
from kvconvert.card import add_section
from kvconvert.checkpoint import resolve
from kvconvert.config.matryoshka import MatryoshkaRunRequest
from kvconvert.errors import KVConvertError
from kvconvert.export import prepare_output
from kvconvert.heal.data import text_windows
from kvconvert.io.staging import default_mode, default_modes, staged
from kvconvert.matryoshka.moments import collect_kv_moments
from kvconvert.matryoshka.projections import (
    FILENAME,
    Projections,
    pca_bases,
    save_projections,
    uniform_rate,
)
from kvconvert.matryoshka.search import refine_rates, score, teacher_logits
from kvconvert.matryoshka.train import TrainConfig, train_projections
from kvconvert.modeling import load_model, load_tokenizer, resolve_device, resolve_dtype
from kvconvert.progress import Progress, Silent
from kvconvert.record import RECORD, dump_record, new_record, read_record
from kvconvert.runtime.matryoshka import MatryoshkaRuntime
from kvconvert.textdata import iter_documents, windows_digest


def train_config(req: MatryoshkaRunRequest) -> TrainConfig:
    """The training settings of a run (its config's training fields)."""
    return TrainConfig(
        steps=req.steps,
        batch_size=req.batch_size,
        lr=req.lr,
        kl_weight=req.kl_weight,
        ce_weight=req.ce_weight,
        seed=req.seed,
        values_only=req.values_only,
    )


@dataclass(frozen=True)
class MatryoshkaResult:
    output: Path
    section: dict
    projections: Projections


def calibration_windows(
    tokenizer, datasets: list[str], n: int, seq_len: int, text_field: str | None = None
) -> torch.Tensor:
    """`n` windows of `seq_len` tokens from the datasets in order (local text; no `self` sampling here)."""
    parts, have = [], 0
    for spec in datasets:
        rows = text_windows(tokenizer, iter_documents(spec, text_field), seq_len, n - have)
        parts.append(rows)
        have += len(rows)
        if have >= n:
            break
    if have < n:
        raise KVConvertError(f"the datasets give {have} windows of {seq_len} tokens, {n} needed; add text")
    return torch.cat(parts)


def build_projections(
    model, train_w, heldout_w, req: MatryoshkaRunRequest, progress: Progress
) -> tuple[Projections, dict]:
    """PCA init, training and rate search on a loaded model; returns the projections and what was done."""
    t0 = time.perf_counter()
    moments = collect_kv_moments(model, train_w, progress=progress)
    key_m, value_m = moments.mean()
    layers, n_kv, head_dim = key_m.shape[0], key_m.shape[1], key_m.shape[-1]
    step = req.rate_step or max(1, head_dim // 8)
    if req.values_only:  # keys keep every dim: (D + r_v) / 2D = budget
        rate = uniform_rate(head_dim, 2 * req.budget - 1, step)
        keys = torch.full((layers, n_kv), head_dim, dtype=torch.long)
    else:
        rate = uniform_rate(head_dim, req.budget, step)
        keys = torch.full((layers, n_kv), rate, dtype=torch.long)
    values = torch.full((layers, n_kv), rate, dtype=torch.long)
    proj = Projections(pca_bases(key_m), pca_bases(value_m), keys, values)
    info: dict = {"moments_tokens": moments.tokens, "step": step, "uniform_rate": rate, "seconds": {}}
    info["seconds"]["moments"] = time.perf_counter() - t0
    train = train_config(req)
    if train.steps:
        result = train_projections(model, proj, train_w, train, step, progress=progress)
        proj = result.projections
        info["train"] = {
            "steps": train.steps,
            "batch_size": train.batch_size,
            "tokens": result.tokens,
            "lr": train.lr,
            "kl_weight": train.kl_weight,
            "ce_weight": train.ce_weight,
            "first_loss": result.losses[0],
            "final_loss": sum(result.losses[-10:]) / len(result.losses[-10:]),
        }
        info["seconds"]["train"] = result.seconds
    MatryoshkaRuntime(proj).attach(model)
    heldout_w = heldout_w.to(next(model.parameters()).device)
    reference = teacher_logits(model, heldout_w)
    info["heldout_kl"] = score(model, proj, heldout_w, reference)
    if req.search:
        t1 = time.perf_counter()
        found = refine_rates(
            model,
            proj,
            heldout_w,
            req.budget,
            step,
            req.search_evals,
            values_only=req.values_only,
            progress=progress,
            objective=req.search_objective,
        )
        # moves are accepted only when a real forward on the held-out windows lowers the search objective
        searched_kl = (
            found.kl if req.search_objective == "kl" else score(model, found.projections, heldout_w, reference)
        )
        info["search"] = {
            "objective": req.search_objective,
            "uniform_kl": info["heldout_kl"],
            "start": found.uniform_kl,
            "searched": found.kl,
            "searched_kl": searched_kl,
            "tried": found.tried,
            "moves": [list(map(list, m)) for m in found.moves],
        }
        keep = searched_kl <= info["heldout_kl"] if req.search_objective == "kl" else True
        if keep:
            proj, info["heldout_kl"] = found.projections, searched_kl
        info["search"]["kept"] = "searched" if keep else "uniform"
        info["seconds"]["search"] = time.perf_counter() - t1
    return proj, info


def run_matryoshka(
    req: MatryoshkaRunRequest, progress: Progress | None = None, *, in_place_ok: bool = False
) -> MatryoshkaResult:
    """Run MatryoshkaKV on `req.model` into `req.output`. `in_place_ok`: the output may be the model itself (a
    recipe adds the projections to its own output); otherwise that is refused like any output overlapping the input."""
    progress = progress or Silent()
    if not 0 < req.budget <= 1:
        raise KVConvertError(f"--budget {req.budget} must be in (0, 1]")
    if req.values_only and req.budget <= 0.5:
        raise KVConvertError(f"--values-only keeps every key dim, so --budget {req.budget} must be above 0.5")
    if req.fold_values and not req.values_only:
        raise KVConvertError("--fold-values is exact only for a values-only cut; add --values-only")
    ckpt = resolve(req.model, progress=progress)
    in_place = in_place_ok and req.output.resolve() == ckpt.path.resolve()
    if not in_place:
        prepare_output(req.output, ckpt.path, req.overwrite)
    device = resolve_device(req.device)
    model = load_model(ckpt, device, resolve_dtype(req.dtype, device))
    tokenizer = load_tokenizer(ckpt)
    windows = calibration_windows(tokenizer, req.datasets, req.samples + req.heldout, req.seq_len, req.text_field)
    train_w, heldout_w = windows[: req.samples], windows[req.samples :]
    proj, info = build_projections(model, train_w, heldout_w, req, progress)
    section = {
        "kvconvert_version": __version__,
        "source": req.model,
        "budget": req.budget,
        "kept_fraction": proj.fraction(),
        "keys": "post-RoPE, per (layer, KV head) orthogonal basis; queries projected the same way",
        "values": "per (layer, KV head) orthogonal basis; decoded before o_proj",
        "file": FILENAME,
        "data": req.datasets,
        "samples": req.samples,
        "heldout": req.heldout,
        "seq_len": req.seq_len,
        "windows_sha256": windows_digest(windows),
        "key_rates": proj.key_rates.tolist(),
        "value_rates": proj.value_rates.tolist(),
        **{k: v for k, v in info.items() if k != "seconds"},
    }
    if req.fold_values:
        folded = section | {"folded_into_v_proj": True}
        write_folded(model, tokenizer, ckpt.path, req.output, proj, folded, req.overwrite)
    elif in_place:
        write_in_place(req.output, proj, section)
    else:
        write_output(ckpt.path, req.output, proj, section, req.overwrite)
    return MatryoshkaResult(req.output, section | {"seconds": info["seconds"]}, proj)


def write_folded(model, tokenizer, source: Path, output: Path, proj: Projections, section: dict, overwrite: bool):
    """A stock checkpoint whose v_proj holds the values-only cut (exact), with the record section."""
    from kvconvert.matryoshka.fold import fold_value_cut
    from kvconvert.runtime.matryoshka import detach

    detach(model)
    fold_value_cut(model, proj)
    with staged(output, overwrite=overwrite, inputs=[source]) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / RECORD).write_text(dump_record(new_record(matryoshka=section)))
        default_modes(tmp)


def write_in_place(output: Path, proj: Projections, section: dict) -> None:
    """Add the projections file (atomically) and the record section to an existing kvconvert output."""
    with staged(output / FILENAME, overwrite=True, directory=False) as tmp:  # the recipe's own output
        save_projections(tmp, proj, {"budget": section["budget"], "kept_fraction": section["kept_fraction"]})
        default_mode(tmp)
    add_section(output, matryoshka=section)


def write_output(source: Path, output: Path, proj: Projections, section: dict, overwrite: bool) -> None:
    """Copy the source checkpoint's files unchanged, add the projections and the record section, then swap in."""
    with staged(output, overwrite=overwrite, inputs=[source]) as tmp:
        for path in sorted(source.iterdir()):
            if path.is_file() and path.name != FILENAME:
                shutil.copyfile(path, tmp / path.name)
        save_projections(tmp / FILENAME, proj, {"budget": section["budget"], "kept_fraction": section["kept_fraction"]})
        record = (read_record(tmp) or new_record()).with_sections(matryoshka=section)
        (tmp / RECORD).write_text(dump_record(record))
        default_modes(tmp)
