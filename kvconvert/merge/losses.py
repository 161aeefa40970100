"""Batched merge losses for groups of whole KV heads: what the grouping search scores.

Each method's loss for a group depends only on sub-blocks of layer-level (weighted) moments, so every candidate
group of a layer is scored with a few batched eigenvalue calls instead of one decomposition per group. Each
method supplies its own batched scorer (`Method.batched`); the helpers here are shared.
"""

from __future__ import annotations

import torch

from kvconvert.families import AttentionGeometry
from kvconvert.merge.moments import LayerMoments
from kvconvert.merge.problem import BatchedLoss

CHUNK_BYTES = 64 * 2**20


def group_losses(lm: LayerMoments, geom: AttentionGeometry, method: str, coherence: torch.Tensor) -> BatchedLoss:
    """Key and value losses (method metric) of arbitrary groups of whole KV heads of one layer."""
    from kvconvert.merge import registry

    return registry.get(method).batched(lm, geom, coherence)


GroupLosses = group_losses
"""Former name (a class until the methods became plug-ins)."""


def block_weight(moment: torch.Tensor, sqrt_w: torch.Tensor, d: int) -> torch.Tensor:
    """blockdiag(sqrt_w) @ moment @ blockdiag(sqrt_w) for per-head (d, d) blocks."""
    n = sqrt_w.shape[0]
    blocks = moment.reshape(n, d, n, d).permute(0, 2, 1, 3)  # (n, n, d, d)
    weighted = sqrt_w[:, None] @ blocks @ sqrt_w[None, :]
    return weighted.permute(0, 2, 1, 3).reshape(n * d, n * d)


def _gather(moment: torch.Tensor, idx: torch.Tensor, d: int) -> torch.Tensor:
    dims = (idx[:, :, None] * d + torch.arange(d)).reshape(len(idx), -1)  # (B, g*d)
    return moment[dims[:, :, None], dims[:, None, :]]


def eig_losses(moment: torch.Tensor, idx: torch.Tensor, d: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual (all but the top `rank` eigenvalues) and total of each group's block; float32 eigenvalues
    suffice to rank candidate groups and take half the time. The total is the exact trace."""
    per = max(1, CHUNK_BYTES // (4 * (idx.shape[1] * d) ** 2))
    losses, totals = [], []
    for start in range(0, len(idx), per):
        block = _gather(moment, idx[start : start + per], d)
        total = block.diagonal(dim1=-2, dim2=-1).sum(-1)
        top = torch.linalg.eigvalsh(block.float()).double()[..., -rank:].clamp(min=0).sum(-1)
        totals.append(total)
        losses.append((total - top).clamp(min=0))
    return torch.cat(losses), torch.cat(totals)
