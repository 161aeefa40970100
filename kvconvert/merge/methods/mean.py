"""`mean`: the GQA-paper baseline. Mean-pool the group's key and value projections; queries and o_proj unchanged."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvconvert.merge.problem import GroupProblem, HeadMerge, MergeLoss, Method


def _maps(p: GroupProblem) -> tuple[torch.Tensor, torch.Tensor]:
    eye = torch.eye(p.head_dim, dtype=torch.float64)
    return torch.cat([eye / p.n_src] * p.n_src, dim=1), torch.cat([eye] * p.n_src, dim=0)


def _residual(moment: torch.Tensor, enc: torch.Tensor, dec: torch.Tensor) -> tuple[float, float]:
    r = torch.eye(len(moment), dtype=moment.dtype) - dec @ enc
    return float((r @ moment @ r.T).diagonal().sum().clamp(min=0)), float(moment.diagonal().sum())


def mean_loss(p: GroupProblem) -> MergeLoss:
    enc, dec = _maps(p)
    return MergeLoss(*_residual(p.key_moment, enc, dec), *_residual(p.value_moment, enc, dec))


def mean_merge(p: GroupProblem) -> HeadMerge:
    enc, dec = _maps(p)
    loss = mean_loss(p)
    return HeadMerge(loss.key_loss, loss.key_total, loss.value_loss, loss.value_total, enc, dec, enc, dec)


def mean_losses(lm, geom, coherence):
    """Mean pooling residual sum_s E||x_s - mean||² = sum_s tr C_ss - (1/g) sum_st tr C_st, from block traces."""
    key, value, d = lm.key_moment.cpu(), lm.value_moment.cpu(), geom.head_dim

    def score(groups: Sequence[tuple[int, ...]]) -> list[tuple[float, float, float, float]]:
        idx = torch.tensor(groups, dtype=torch.long)
        out = []
        for moment in (key, value):
            n = moment.shape[0] // d
            traces = moment.reshape(n, d, n, d).diagonal(dim1=1, dim2=3).sum(-1)  # (n, n) tr C_st
            sub = traces[idx[:, :, None], idx[:, None, :]]
            total = sub.diagonal(dim1=-2, dim2=-1).sum(-1)
            out.append(((total - sub.sum((-1, -2)) / idx.shape[1]).clamp(min=0), total))
        (kl, kt), (vl, vt) = out
        return list(zip(kl.tolist(), kt.tolist(), vl.tolist(), vt.tolist(), strict=True))

    return score


METHOD = Method("mean", mean_loss, mean_merge, mean_losses)
