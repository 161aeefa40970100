"""Batched merge losses for groups of whole KV heads: what the grouping search scores.

Each method's loss for a group depends only on sub-blocks of layer-level (weighted) moments, so every candidate
group of a layer is scored with a few batched eigenvalue calls instead of one decomposition per group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvconvert.families import AttentionGeometry
from kvconvert.merge import rope
from kvconvert.merge.moments import LayerMoments
from kvconvert.merge.pca import psd_sqrt

CHUNK_BYTES = 64 * 2**20


class GroupLosses:
    """Key and value losses (method metric) of arbitrary groups of whole KV heads of one layer."""

    def __init__(self, lm: LayerMoments, geom: AttentionGeometry, method: str, coherence: torch.Tensor):
        self.kind = "mean" if method == "mean" else "pca"
        weighted = method == "weighted"
        n, d, r, rep = geom.num_kv_heads, geom.head_dim, geom.rotary_dim, geom.n_rep
        self.n, self.d, self.p = n, d, d - r
        # The weighting (large batched products) runs where the moments are (the GPU when there is one); the
        # tables the search reads are then kept on the CPU, where its many small eigen-solves are done.
        key, value = lm.key_moment, lm.value_moment
        if self.kind == "mean":
            self.key, self.value = key.cpu(), value.cpu()
            return
        z = rope.complex_moment(key, n, d, r)
        if weighted:
            mu = rope.complex_mean(lm.key_mean, n, d, r)
            z = z - coherence.to(z.device)[:, None, None] * (mu.unsqueeze(-1) * mu.conj().unsqueeze(-2))
            sw = lm.query_pair_energy.reshape(n, rep, -1).sum(1).T.sqrt()  # (pairs, n)
            z = sw.unsqueeze(-1) * z * sw.unsqueeze(-2)
        self.passes = rope.pass_block(key, n, d, r) if self.p else None
        if weighted:
            out = psd_sqrt(lm.out_gram.reshape(n, rep, d, d).sum(1))
            value = _block_weight(value, out, d)
            if self.p:
                qp = psd_sqrt(lm.query_pass_moment.reshape(n, rep, self.p, self.p).sum(1))
                self.passes = _block_weight(self.passes, qp, self.p)
        self.pairs, self.value = z.cpu(), value.cpu()
        self.passes = None if self.passes is None else self.passes.cpu()

    def __call__(self, groups: Sequence[tuple[int, ...]]) -> list[tuple[float, float, float, float]]:
        """(key loss, key total, value loss, value total) of each group (all groups the same size)."""
        idx = torch.tensor(groups, dtype=torch.long)
        if self.kind == "mean":
            return _mean_losses(self.key, self.value, idx, self.d)
        zg = self.pairs[:, idx[:, :, None], idx[:, None, :]].permute(1, 0, 2, 3)  # (B, pairs, g, g)
        ev = torch.linalg.eigvalsh(zg).clamp(min=0)
        k_total, k_loss = ev.sum((-1, -2)), ev[..., :-1].sum((-1, -2))
        if self.p:
            pl, pt = _eig_losses(self.passes, idx, self.p, self.p)
            k_loss, k_total = k_loss + pl, k_total + pt
        v_loss, v_total = _eig_losses(self.value, idx, self.d, self.d)
        return list(zip(k_loss.tolist(), k_total.tolist(), v_loss.tolist(), v_total.tolist(), strict=True))


def _block_weight(moment: torch.Tensor, sqrt_w: torch.Tensor, d: int) -> torch.Tensor:
    """blockdiag(sqrt_w) @ moment @ blockdiag(sqrt_w) for per-head (d, d) blocks."""
    n = sqrt_w.shape[0]
    blocks = moment.reshape(n, d, n, d).permute(0, 2, 1, 3)  # (n, n, d, d)
    weighted = sqrt_w[:, None] @ blocks @ sqrt_w[None, :]
    return weighted.permute(0, 2, 1, 3).reshape(n * d, n * d)


def _gather(moment: torch.Tensor, idx: torch.Tensor, d: int) -> torch.Tensor:
    dims = (idx[:, :, None] * d + torch.arange(d)).reshape(len(idx), -1)  # (B, g*d)
    return moment[dims[:, :, None], dims[:, None, :]]


def _eig_losses(moment: torch.Tensor, idx: torch.Tensor, d: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def _mean_losses(key: torch.Tensor, value: torch.Tensor, idx: torch.Tensor, d: int) -> list:
    """Mean pooling residual sum_s E||x_s - mean||² = sum_s tr C_ss - (1/g) sum_st tr C_st, from block traces."""
    out = []
    for moment in (key, value):
        n = moment.shape[0] // d
        traces = moment.reshape(n, d, n, d).diagonal(dim1=1, dim2=3).sum(-1)  # (n, n) tr C_st
        sub = traces[idx[:, :, None], idx[:, None, :]]
        total = sub.diagonal(dim1=-2, dim2=-1).sum(-1)
        out.append(((total - sub.sum((-1, -2)) / idx.shape[1]).clamp(min=0), total))
    (kl, kt), (vl, vt) = out
    return list(zip(kl.tolist(), kt.tolist(), vl.tolist(), vt.tolist(), strict=True))
