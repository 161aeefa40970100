"""Training windows for healing: text sources first, teacher samples (`self`) to fill the budget, epochs repeat."""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import torch

from kvconvert.errors import KVConvertError
from kvconvert.progress import Progress
from kvconvert.textdata import SELF, iter_documents, sample_windows, token_stream, with_bos
from kvconvert.textfile import TextFile


def text_windows(tokenizer, texts: Iterable[str | TextFile], seq_len: int, limit: int) -> torch.Tensor:
    """Up to `limit` consecutive windows of `seq_len` tokens (BOS first, EOS between documents); fewer if short."""
    bos = tokenizer.bos_token_id
    body = seq_len - (1 if bos is not None else 0)
    stream = token_stream(tokenizer, texts, limit * body)
    n = len(stream) // body
    return with_bos(stream[: n * body].reshape(n, body), bos)


def window_file(path: Path, seq_len: int) -> torch.Tensor:
    """Token windows saved by an earlier run (`windows.safetensors` in its --state-dir, kept with --keep-state)."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise KVConvertError(f"window file {path} does not exist")
    rows = load_file(str(path)).get("windows")
    if rows is None or rows.ndim != 2 or rows.shape[1] != seq_len:
        got = None if rows is None else list(rows.shape)
        raise KVConvertError(f"{path} holds windows of shape {got}, not (n, {seq_len}); match --seq-len")
    return rows.long()


def build_windows(
    teacher,
    tokenizer,
    datasets: list[str],
    n_windows: int,
    seq_len: int,
    *,
    seed: int = 0,
    text_field: str | None = None,
    sample_batch_size: int = 8,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, list[dict]]:
    """(windows (n, seq_len), sources): text datasets (or saved window files) in order, then `self` samples the
    teacher for the rest.

    Returns at most `n_windows` windows; fewer when the text runs out and `self` is not among the sources (the
    training schedule then repeats them in new orders, epoch after epoch).
    """
    if not datasets:
        raise KVConvertError("no healing data; pass --dataset (a text file, a dataset, or `self`)")
    parts, sources = [], []
    have = 0
    for spec in datasets:
        if spec == SELF:
            continue
        if spec.endswith(".safetensors"):
            rows = window_file(Path(spec), seq_len)[: n_windows - have]
        else:
            rows = text_windows(tokenizer, iter_documents(spec, text_field), seq_len, n_windows - have)
        if len(rows) == 0:
            raise KVConvertError(f"dataset {spec} has fewer than {seq_len} tokens; lower --seq-len or use more text")
        parts.append(rows)
        sources.append({"dataset": spec, "windows": len(rows)})
        have += len(rows)
        if have >= n_windows:
            break
    if SELF in datasets and have < n_windows:
        need = n_windows - have
        rows = sample_windows(teacher, tokenizer, need, seq_len, sample_batch_size, seed, None, progress, "the teacher")
        parts.append(rows)
        sources.append({"dataset": SELF, "windows": need, "seed": seed})
    return torch.cat(parts), sources


@lru_cache(maxsize=2)
def _permutation(n_windows: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist())


def window_order(n_windows: int, step: int, batch: int, seed: int) -> list[int]:
    """Window indices of global `step` (`batch` windows): one seeded permutation per epoch, so resumable."""
    return [
        _permutation(n_windows, seed, g // n_windows)[g % n_windows] for g in range(step * batch, (step + 1) * batch)
    ]
