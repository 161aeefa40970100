"""Activation-aware low-rank merges (the `svd` and `weighted` methods): per-RoPE-pair complex PCA of the group's
keys and PCA of its values, optionally weighted by what the merged head feeds."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvconvert.families import AttentionGeometry
from kvconvert.merge import rope
from kvconvert.merge.losses import block_weight, eig_losses
from kvconvert.merge.moments import LayerMoments
from kvconvert.merge.pca import complex_rank1, psd_sqrt, weighted_pca
from kvconvert.merge.problem import GroupProblem, HeadMerge, MergeLoss


def _pair_moment(p: GroupProblem, weighted: bool) -> torch.Tensor:
    s, d, r = p.n_src, p.head_dim, p.rotary_dim
    z = rope.complex_moment(p.key_moment, s, d, r)
    if weighted:
        mu = rope.complex_mean(p.key_mean, s, d, r)
        z = z - p.pair_coherence[:, None, None] * (mu.unsqueeze(-1) * mu.conj().unsqueeze(-2))
    return z


def _block_sqrt(blocks: torch.Tensor, weighted: bool) -> torch.Tensor | None:
    return torch.block_diag(*blocks) if weighted else None


def _eig_loss(moment: torch.Tensor, rank: int, sqrt_w: torch.Tensor | None) -> tuple[float, float]:
    m = moment if sqrt_w is None else sqrt_w @ moment @ sqrt_w
    vals = torch.linalg.eigvalsh(m)
    total = float(vals.clamp(min=0).sum())
    return max(total - float(vals[..., -rank:].clamp(min=0).sum()), 0.0), total


def low_rank_loss(p: GroupProblem, weighted: bool) -> MergeLoss:
    z = _pair_moment(p, weighted)
    if weighted:
        sw = p.query_pair_energy.T.sqrt()
        z = sw.unsqueeze(-1) * z * sw.unsqueeze(-2)
    vals = torch.linalg.eigvalsh(z).clamp(min=0)
    k_total = float(vals.sum())
    k_loss = k_total - float(vals[..., -1].sum())
    if p.rotary_dim < p.head_dim:
        pm = rope.pass_block(p.key_moment, p.n_src, p.head_dim, p.rotary_dim)
        loss, total = _eig_loss(pm, p.head_dim - p.rotary_dim, _block_sqrt(p.query_pass_sqrt, weighted))
        k_loss, k_total = k_loss + loss, k_total + total
    v_loss, v_total = _eig_loss(p.value_moment, p.head_dim, _block_sqrt(p.out_sqrt, weighted))
    return MergeLoss(max(k_loss, 0.0), k_total, v_loss, v_total)


def low_rank_merge(p: GroupProblem, weighted: bool) -> HeadMerge:
    s, d, r = p.n_src, p.head_dim, p.rotary_dim
    fit = complex_rank1(_pair_moment(p, weighted), p.query_pair_energy.T if weighted else None)
    k_loss, k_total = fit.loss, fit.total
    pass_enc = pass_dec = None
    if r < d:
        pm = rope.pass_block(p.key_moment, s, d, r)
        pfit = weighted_pca(pm, d - r, _block_sqrt(p.query_pass_sqrt, weighted))
        pass_enc, pass_dec = pfit.encoder, pfit.decoder
        k_loss, k_total = k_loss + pfit.loss, k_total + pfit.total
    k_enc, k_dec = rope.real_maps(fit.encoder, fit.decoder, d, r, pass_enc, pass_dec)
    v = weighted_pca(p.value_moment, d, _block_sqrt(p.out_sqrt, weighted))
    return HeadMerge(k_loss, k_total, v.loss, v.total, k_enc, k_dec, v.encoder, v.decoder)


class LowRankLosses:
    """Batched `low_rank_loss` of groups of whole KV heads of one layer, from sub-blocks of the layer's
    (weighted) moments: a few batched eigenvalue calls instead of one decomposition per group."""

    def __init__(self, lm: LayerMoments, geom: AttentionGeometry, coherence: torch.Tensor, weighted: bool):
        n, d, r, rep = geom.num_kv_heads, geom.head_dim, geom.rotary_dim, geom.n_rep
        self.d, self.p = d, d - r
        # The weighting (large batched products) runs where the moments are (the GPU when there is one); the
        # tables the search reads are then kept on the CPU, where its many small eigen-solves are done.
        key, value = lm.key_moment, lm.value_moment
        z = rope.complex_moment(key, n, d, r)
        if weighted:
            mu = rope.complex_mean(lm.key_mean, n, d, r)
            z = z - coherence.to(z.device)[:, None, None] * (mu.unsqueeze(-1) * mu.conj().unsqueeze(-2))
            sw = lm.query_pair_energy.reshape(n, rep, -1).sum(1).T.sqrt()  # (pairs, n)
            z = sw.unsqueeze(-1) * z * sw.unsqueeze(-2)
        passes = rope.pass_block(key, n, d, r) if self.p else None
        if weighted:
            out = psd_sqrt(lm.out_gram.reshape(n, rep, d, d).sum(1))
            value = block_weight(value, out, d)
            if self.p:
                qp = psd_sqrt(lm.query_pass_moment.reshape(n, rep, self.p, self.p).sum(1))
                passes = block_weight(passes, qp, self.p)
        self.pairs, self.value = z.cpu(), value.cpu()
        self.passes = None if passes is None else passes.cpu()

    def __call__(self, groups: Sequence[tuple[int, ...]]) -> list[tuple[float, float, float, float]]:
        idx = torch.tensor(groups, dtype=torch.long)
        zg = self.pairs[:, idx[:, :, None], idx[:, None, :]].permute(1, 0, 2, 3)  # (B, pairs, g, g)
        ev = torch.linalg.eigvalsh(zg).clamp(min=0)
        k_total, k_loss = ev.sum((-1, -2)), ev[..., :-1].sum((-1, -2))
        if self.p:
            pl, pt = eig_losses(self.passes, idx, self.p, self.p)
            k_loss, k_total = k_loss + pl, k_total + pt
        v_loss, v_total = eig_losses(self.value, idx, self.d, self.d)
        return list(zip(k_loss.tolist(), k_total.tolist(), v_loss.tolist(), v_total.tolist(), strict=True))
