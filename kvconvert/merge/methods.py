"""Merge methods as a registry: each turns one group's moments into key and value encoder/decoder maps.

A method has a cheap `loss` (eigenvalues only, used by the grouping search) and a full `merge`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvconvert.merge import rope
from kvconvert.merge.pca import complex_rank1, weighted_pca


@dataclass(frozen=True)
class GroupProblem:
    """Everything one new KV head's merge needs, for its S source KV heads (float64 moments)."""

    head_dim: int
    rotary_dim: int
    key_moment: torch.Tensor  # (S*d, S*d) E[k kᵀ] before RoPE
    key_mean: torch.Tensor  # (S*d,) E[k]
    value_moment: torch.Tensor  # (S*d, S*d) E[v vᵀ]
    query_pair_energy: torch.Tensor  # (S, pairs): sum over the queries reading source s of E|q_pair|²
    query_pass_sqrt: torch.Tensor  # (S, p, p): sqrt of the same for the unrotated dims, as a moment
    out_sqrt: torch.Tensor  # (S, d, d): sqrt of the sum over those queries of O_iᵀ O_i
    pair_coherence: torch.Tensor  # (pairs,): share of a constant key offset that softmax ignores, in [0, 1]

    @property
    def n_src(self) -> int:
        return self.key_moment.shape[0] // self.head_dim


@dataclass(frozen=True)
class MergeLoss:
    """Residual and total energy of keys and values, in the method's own metric."""

    key_loss: float
    key_total: float
    value_loss: float
    value_total: float


@dataclass(frozen=True)
class HeadMerge(MergeLoss):
    """Maps of one new KV head: k_new = key_encoder @ [k_s], k_s ≈ key_decoder[s] @ k_new (same for values)."""

    key_encoder: torch.Tensor = None  # (d, S*d)
    key_decoder: torch.Tensor = None  # (S*d, d)
    value_encoder: torch.Tensor = None
    value_decoder: torch.Tensor = None


@dataclass(frozen=True)
class Method:
    name: str
    loss: Callable[[GroupProblem], MergeLoss]
    merge: Callable[[GroupProblem], HeadMerge]


def _pair_moment(p: GroupProblem, weighted: bool) -> torch.Tensor:
    s, d, r = p.n_src, p.head_dim, p.rotary_dim
    z = rope.complex_moment(p.key_moment, s, d, r)
    if weighted:
        mu = rope.complex_mean(p.key_mean, s, d, r)
        z = z - p.pair_coherence[:, None, None] * (mu.unsqueeze(-1) * mu.conj().unsqueeze(-2))
    return z


def _block_sqrt(p: GroupProblem, blocks: torch.Tensor, weighted: bool) -> torch.Tensor | None:
    return torch.block_diag(*blocks) if weighted else None


def _eig_loss(moment: torch.Tensor, rank: int, sqrt_w: torch.Tensor | None) -> tuple[float, float]:
    m = moment if sqrt_w is None else sqrt_w @ moment @ sqrt_w
    vals = torch.linalg.eigvalsh(m)
    total = float(vals.clamp(min=0).sum())
    return max(total - float(vals[..., -rank:].clamp(min=0).sum()), 0.0), total


def _low_rank_loss(p: GroupProblem, weighted: bool) -> MergeLoss:
    z = _pair_moment(p, weighted)
    if weighted:
        sw = p.query_pair_energy.T.sqrt()
        z = sw.unsqueeze(-1) * z * sw.unsqueeze(-2)
    vals = torch.linalg.eigvalsh(z).clamp(min=0)
    k_total = float(vals.sum())
    k_loss = k_total - float(vals[..., -1].sum())
    if p.rotary_dim < p.head_dim:
        pm = rope.pass_block(p.key_moment, p.n_src, p.head_dim, p.rotary_dim)
        loss, total = _eig_loss(pm, p.head_dim - p.rotary_dim, _block_sqrt(p, p.query_pass_sqrt, weighted))
        k_loss, k_total = k_loss + loss, k_total + total
    v_loss, v_total = _eig_loss(p.value_moment, p.head_dim, _block_sqrt(p, p.out_sqrt, weighted))
    return MergeLoss(max(k_loss, 0.0), k_total, v_loss, v_total)


def _low_rank_merge(p: GroupProblem, weighted: bool) -> HeadMerge:
    s, d, r = p.n_src, p.head_dim, p.rotary_dim
    fit = complex_rank1(_pair_moment(p, weighted), p.query_pair_energy.T if weighted else None)
    k_loss, k_total = fit.loss, fit.total
    pass_enc = pass_dec = None
    if r < d:
        pm = rope.pass_block(p.key_moment, s, d, r)
        pfit = weighted_pca(pm, d - r, _block_sqrt(p, p.query_pass_sqrt, weighted))
        pass_enc, pass_dec = pfit.encoder, pfit.decoder
        k_loss, k_total = k_loss + pfit.loss, k_total + pfit.total
    k_enc, k_dec = rope.real_maps(fit.encoder, fit.decoder, d, r, pass_enc, pass_dec)
    v = weighted_pca(p.value_moment, d, _block_sqrt(p, p.out_sqrt, weighted))
    return HeadMerge(k_loss, k_total, v.loss, v.total, k_enc, k_dec, v.encoder, v.decoder)


def _mean_maps(p: GroupProblem) -> tuple[torch.Tensor, torch.Tensor]:
    eye = torch.eye(p.head_dim, dtype=torch.float64)
    return torch.cat([eye / p.n_src] * p.n_src, dim=1), torch.cat([eye] * p.n_src, dim=0)


def _residual(moment: torch.Tensor, enc: torch.Tensor, dec: torch.Tensor) -> tuple[float, float]:
    r = torch.eye(len(moment), dtype=moment.dtype) - dec @ enc
    return float((r @ moment @ r.T).diagonal().sum().clamp(min=0)), float(moment.diagonal().sum())


def mean_loss(p: GroupProblem) -> MergeLoss:
    enc, dec = _mean_maps(p)
    return MergeLoss(*_residual(p.key_moment, enc, dec), *_residual(p.value_moment, enc, dec))


def mean_merge(p: GroupProblem) -> HeadMerge:
    """GQA-paper baseline: mean-pool the group's key and value projections; queries and o_proj unchanged."""
    enc, dec = _mean_maps(p)
    loss = mean_loss(p)
    return HeadMerge(loss.key_loss, loss.key_total, loss.value_loss, loss.value_total, enc, dec, enc, dec)


METHODS: dict[str, Method] = {
    "mean": Method("mean", mean_loss, mean_merge),
    # Plain activation PCA of the group's keys (per RoPE pair, complex) and values.
    "svd": Method("svd", lambda p: _low_rank_loss(p, False), lambda p: _low_rank_merge(p, False)),
    # The same, weighted by what the merge feeds: query energy per key pair, o_proj columns for values.
    "weighted": Method("weighted", lambda p: _low_rank_loss(p, True), lambda p: _low_rank_merge(p, True)),
}
