"""Calibrate stage: stream token windows through the model layer by layer and sum x and x xᵀ of every layer's
attention input (float64). Several processes (torchrun / accelerate launch) split the windows and all-reduce."""

from __future__ import annotations

from pathlib import Path

import torch

from kvconvert.checkpoint import Checkpoint
from kvconvert.distributed import Part, all_reduce_sum, gather_rows
from kvconvert.modeling import load_model, load_tokenizer
from kvconvert.progress import Progress, Silent
from kvconvert.stats import CalibrationStats, pack
from kvconvert.streaming import HiddenStore, LayerRunner
from kvconvert.textdata import SELF, iter_texts, sample_windows, token_windows, windows_digest


class _Captured(Exception):
    """Raised by the capture hook when the rest of the layer is not needed."""


def layer_pass(
    runner: LayerRunner, module, layer: int, hidden: torch.Tensor, need_output: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(attention input, layer output or None) of one decoder layer on `hidden`."""
    captured = {}

    def hook(_, args):
        captured["x"] = args[0]
        if not need_output:
            raise _Captured

    handle = runner.ckpt.family.attention_input_module(module).register_forward_pre_hook(hook)
    try:
        out = runner.forward(module, layer, hidden)
    except _Captured:
        out = None
    finally:
        handle.remove()
    return captured["x"], out


@torch.no_grad()
def accumulate(
    ckpt: Checkpoint,
    windows: torch.Tensor,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    offload_dir: Path | None = None,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(sum_x (L, h), packed sum_xx per layer) over `windows` (n, seq_len), float64, one layer in memory."""
    geom = ckpt.family.geometry(ckpt.config)
    n_layers, hidden_size = geom.num_layers, geom.hidden_size
    acc_device = device if device.type == "cuda" else torch.device("cpu")
    sum_x = torch.zeros(n_layers, hidden_size, dtype=torch.float64, device=acc_device)
    packed: list[torch.Tensor] = []
    runner = LayerRunner(ckpt, device, dtype)
    store_device = device if offload_dir is None else torch.device("cpu")
    store = HiddenStore((len(windows), windows.shape[1], hidden_size), dtype, store_device, offload_dir)
    advance = (progress or Silent()).task("calibrating (layers)", n_layers)
    try:
        batches = [(s, min(s + batch_size, len(windows))) for s in range(0, len(windows), batch_size)]
        for start, stop in batches:
            store.write(start, runner.embed(windows[start:stop]))
        for layer in range(n_layers):
            module = runner.load(layer)
            last = layer == n_layers - 1
            sum_xx = torch.zeros(hidden_size, hidden_size, dtype=torch.float64, device=acc_device)
            for start, stop in batches:
                x, out = layer_pass(runner, module, layer, store.read(start, stop, device), need_output=not last)
                if out is not None:
                    store.write(start, out)
                x = x.reshape(-1, hidden_size).to(acc_device, torch.float64)
                sum_xx.addmm_(x.T, x)
                sum_x[layer] += x.sum(0)
            packed.append(pack(sum_xx).cpu())
            del sum_xx, module
            runner.free(layer)
            advance()
    finally:
        store.close()
    return sum_x.cpu(), packed


def calibration_windows(
    ckpt: Checkpoint,
    dataset: str,
    samples: int,
    seq_len: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    text_field: str | None = None,
    part: Part | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """All token windows (samples, seq_len): from a dataset spec, or sampled from the model for `self` (each
    process samples its own batches, then they are shared)."""
    part = part or Part()
    tokenizer = load_tokenizer(ckpt)
    if dataset != SELF:
        return token_windows(tokenizer, iter_texts(dataset, text_field), samples, seq_len, dataset)
    (progress or Silent()).log(f"sampling {samples} x {seq_len} tokens from the model (--dataset self)")
    model = load_model(ckpt, device, dtype)
    spans = part.batches(samples, batch_size)
    local = sample_windows(model, tokenizer, samples, seq_len, batch_size, seed, spans)
    del model
    return gather_rows(local, spans, samples, part)


def calibrate(
    ckpt: Checkpoint,
    dataset: str,
    samples: int,
    seq_len: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    text_field: str | None = None,
    offload_dir: Path | None = None,
    part: Part | None = None,
    progress: Progress | None = None,
) -> CalibrationStats:
    """Statistics of `samples` windows of `seq_len` tokens from `dataset` (a source spec or `self`).

    Under several processes (`part`), each handles its dealt batches and the sums are all-reduced.
    """
    part = part or Part()
    device = part.device or device
    windows = calibration_windows(
        ckpt, dataset, samples, seq_len, batch_size, device, dtype, seed, text_field, part, progress
    )
    local = torch.cat([windows[s:e] for s, e in part.batches(samples, batch_size)])
    sum_x, packed = accumulate(ckpt, local, batch_size, device, dtype, offload_dir, progress)
    all_reduce_sum(sum_x, part)
    for p in packed:
        all_reduce_sum(p, part)
    source = {
        "dataset": dataset,
        "samples": samples,
        "seq_len": seq_len,
        "seed": seed,
        "dtype": str(dtype).removeprefix("torch."),
        "tokens_sha256": windows_digest(windows),
    }
    stats = CalibrationStats(sum_x, packed, windows.numel(), ckpt.fingerprint(), source)
    stats.check_finite()
    return stats
