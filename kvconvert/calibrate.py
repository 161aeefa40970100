"""Calibrate stage: run text through the model and sum x and x xᵀ of every layer's attention input (float64)."""

from __future__ import annotations

import contextlib

import torch

from kvconvert.checkpoint import Checkpoint
from kvconvert.families import Family
from kvconvert.modeling import load_model, load_tokenizer
from kvconvert.progress import Progress, Silent
from kvconvert.stats import CalibrationStats
from kvconvert.textdata import SELF, iter_texts, sample_windows, token_windows, windows_digest


class _Done(Exception):
    """Raised by the last layer's hook: nothing after it is needed."""


@torch.no_grad()
def accumulate(
    model, family: Family, windows: torch.Tensor, batch_size: int, progress: Progress | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(sum_x (L, h), sum_xx (L, h, h), n_tokens) over `windows` (n, seq_len) token ids, all float64."""
    geom = family.geometry(model.config)
    n_layers, hidden = geom.num_layers, geom.hidden_size
    device = next(model.parameters()).device
    acc_device = device if device.type == "cuda" else torch.device("cpu")
    sum_x = torch.zeros(n_layers, hidden, dtype=torch.float64, device=acc_device)
    sum_xx = torch.zeros(n_layers, hidden, hidden, dtype=torch.float64, device=acc_device)

    def hook_for(layer: int):
        def hook(module, args):
            x = args[0].reshape(-1, hidden).to(acc_device, torch.float64)
            sum_xx[layer].addmm_(x.T, x)
            sum_x[layer] += x.sum(0)
            if layer == n_layers - 1:
                raise _Done

        return hook

    handles = [family.attention_input_module(model, i).register_forward_pre_hook(hook_for(i)) for i in range(n_layers)]
    advance = (progress or Silent()).task("calibrating", len(windows))
    try:
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size].to(device)
            with contextlib.suppress(_Done):
                model.base_model(input_ids=batch, use_cache=False)
            advance(len(batch))
    finally:
        for h in handles:
            h.remove()
    return sum_x.cpu(), sum_xx.cpu(), windows.numel()


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
    progress: Progress | None = None,
) -> CalibrationStats:
    """Statistics of `samples` windows of `seq_len` tokens from `dataset` (a source spec or `self`)."""
    progress = progress or Silent()
    model = load_model(ckpt, device, dtype)
    tokenizer = load_tokenizer(ckpt)
    if dataset == SELF:
        progress.log(f"sampling {samples} x {seq_len} tokens from the model (--dataset self)")
        windows = sample_windows(model, tokenizer, samples, seq_len, batch_size, seed)
    else:
        windows = token_windows(tokenizer, iter_texts(dataset, text_field), samples, seq_len, dataset)
    sum_x, sum_xx, n = accumulate(model, ckpt.family, windows, batch_size, progress)
    source = {
        "dataset": dataset,
        "samples": samples,
        "seq_len": seq_len,
        "seed": seed,
        "dtype": str(dtype).removeprefix("torch."),
        "tokens_sha256": windows_digest(windows),
    }
    stats = CalibrationStats(sum_x, sum_xx, n, ckpt.fingerprint(), source)
    stats.check_finite()
    return stats
