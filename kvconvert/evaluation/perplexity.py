"""Perplexity on token windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kvconvert.progress import Progress, Silent
from kvconvert.textdata import SELF, iter_documents, sample_windows, token_windows


@torch.no_grad()
def perplexity(
    model, windows: torch.Tensor, batch_size: int = 1, progress: Progress | None = None, subject: str = "model"
) -> float:
    """exp(mean next-token NLL) over all positions after the first of every window."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    advance = (progress or Silent()).task(f"perplexity of {subject} (windows)", len(windows))
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
        count += batch[:, 1:].numel()
        advance(len(batch))
    return math.exp(nll / count)


def eval_windows(
    model,
    tokenizer,
    dataset: str,
    samples: int,
    seq_len: int,
    seed: int,
    batch_size: int,
    progress: Progress | None = None,
    subject: str = "the model",
    text_field: str | None = None,
):
    """Token windows for evaluation; `self` samples them from `model` (pass the baseline to share them)."""
    if dataset == SELF:
        return sample_windows(model, tokenizer, samples, seq_len, max(batch_size, 8), seed, None, progress, subject)
    return token_windows(tokenizer, iter_documents(dataset, text_field), samples, seq_len, dataset)
