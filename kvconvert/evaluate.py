"""Evaluation: perplexity on token windows and KV-cache accounting from the config."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kvconvert.progress import Progress, Silent


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: Progress | None = None) -> float:
    """exp(mean next-token NLL) over all positions after the first of every window."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    advance = (progress or Silent()).task("perplexity", len(windows))
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
        count += batch[:, 1:].numel()
        advance(len(batch))
    return math.exp(nll / count)


def kv_bytes_per_token(config, dtype_bytes: int = 2) -> int:
    """K and V cache bytes per token over all layers, for `dtype_bytes` per element."""
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * n_kv * head_dim * dtype_bytes


def eval_windows(model, tokenizer, dataset: str, samples: int, seq_len: int, seed: int, batch_size: int):
    """Token windows for evaluation; `self` samples them from `model` (pass the baseline to share them)."""
    from kvconvert.textdata import SELF, iter_texts, sample_windows, token_windows

    if dataset == SELF:
        return sample_windows(model, tokenizer, samples, seq_len, max(batch_size, 8), seed)
    return token_windows(tokenizer, iter_texts(dataset), samples, seq_len, dataset)


def evaluate(
    model_spec: str,
    *,
    baseline: str | None = None,
    dataset: str = "self",
    samples: int = 32,
    seq_len: int = 512,
    batch_size: int = 1,
    seed: int = 1,
    device: str = "auto",
    dtype: str = "auto",
    progress: Progress | None = None,
) -> dict:
    """Perplexity and KV bytes/token of a model (and of a baseline, on the same tokens)."""
    from kvconvert.checkpoint import resolve
    from kvconvert.modeling import load_model, load_tokenizer, resolve_device, resolve_dtype
    from kvconvert.textdata import windows_digest

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    specs = {"model": model_spec} | ({"baseline": baseline} if baseline else {})
    ckpts = {role: resolve(spec) for role, spec in specs.items()}
    tokenizer = load_tokenizer(ckpts["model"])
    windows = None
    report: dict = {"dataset": dataset, "samples": samples, "seq_len": seq_len, "seed": seed}
    for role in sorted(ckpts, reverse=True):  # sample from the baseline first when there is one
        model = load_model(ckpts[role], dev, dt)
        if windows is None:
            windows = eval_windows(model, tokenizer, dataset, samples, seq_len, seed, batch_size)
            report["tokens_sha256"] = windows_digest(windows)
        report[role] = {
            "path": specs[role],
            "num_key_value_heads": model.config.num_key_value_heads,
            "perplexity": perplexity(model, windows, batch_size, progress),
            "kv_bytes_per_token": kv_bytes_per_token(model.config, torch.finfo(dt).bits // 8),
        }
        del model
    return report
