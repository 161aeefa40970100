"""QK-norm: merge what attention reads, the normalised keys, in a form the norms can carry exactly.

Attention reads k̂_s = w ⊙ N(k_s) (N: RMS or layer norm over the norm's scope), not the projection k_s. Two steps:

1. Moments of the normalised keys and queries. Over calibration data the norm is linearised at its mean scale:
   k̂_s ≈ diag(w_s) P k_s / r_s, r_s² = E||P k_s||² / n (P removes the mean for layer norm; n is the norm's
   width). Those moments feed the method's grouping search and value merge unchanged.
2. Key maps the norms can carry. A norm erases any gain of its input and commutes only with sign flips, so per
   query head the only exact change is a sign per rotary pair (D_s = ρ·diag(σ_s)), folded into q_proj. With the
   decoder fixed, the best merged key under the query-weighted loss
   sum_s sum_pairs E|q_s,p|² E|k̂_s,p - σ_s,p ŷ_p|² is the query-energy-weighted mean ŷ_p = sum_s λ_s,p σ_s,p k̂_s,p,
   which RoPE commutes with (one real scalar per pair). Its pre-norm key is that mean divided by the new norm
   weight (the first source's), and ρ, the RMS of ŷ over the new weight, goes into the norm weight (fold.py), so
   the shrinkage of averaging partly decorrelated heads survives the renormalisation.
   Exact duplicates merge exactly: λ sums to 1, σ = 1, r_s equal, ρ = 1.
What stays nonlinear (token-wise RMS variation) is left to layer-local refinement.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from kvconvert.families.norms import QKNorm
from kvconvert.merge import rope

EPS = 1e-12


def diagonal_blocks(moment: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The per-head (d, d) blocks C_ss of a (n*d)² moment, shape (n, d, d)."""
    d = moment.shape[0] // n_heads
    return moment.reshape(n_heads, d, n_heads, d).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def norm_scales(
    blocks: torch.Tensor, stored: torch.Tensor, norm: QKNorm
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unit maps U_s = P / r_s (n, d, d), RMS r_s (n,), effective weights w_s (n, d)) of the norm at its mean scale.

    `blocks` are the per-head pre-norm second moments C_ss (n, d, d); the linearised norm is diag(w_s) U_s.
    """
    n_heads, d = blocks.shape[0], blocks.shape[1]
    eff = norm.per_head(stored, n_heads, d).to(blocks)
    center = torch.eye(d, dtype=blocks.dtype, device=blocks.device)
    if norm.kind == "layer":
        center = center - 1.0 / d
    energy = torch.einsum("ij,njk,ik->n", center, blocks, center) / d  # E||P k_s||² / d
    if norm.scope == "all":
        energy = energy.mean().expand(n_heads)
    rms = energy.clamp(min=EPS).sqrt()
    return center.expand(n_heads, d, d) / rms[:, None, None], rms, eff


def normalise(moment: torch.Tensor, mean: torch.Tensor, mats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Moment and mean of blockdiag(L) y from those of y (L: (n, d, d) per head)."""
    n, d = mats.shape[0], mats.shape[1]
    blocks = moment.reshape(n, d, n, d).permute(0, 2, 1, 3)  # (n, n, d, d)
    out = mats[:, None] @ blocks @ mats[None, :].transpose(-1, -2)
    new_mean = (mats @ mean.reshape(n, d, 1)).reshape(-1)
    return out.permute(0, 2, 1, 3).reshape(n * d, n * d), new_mean


def key_maps(
    unit_moment: torch.Tensor,
    pair_energy: torch.Tensor,
    rms: torch.Tensor,
    weight: torch.Tensor,
    head_dim: int,
    rotary_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-norm key encoder (d, S*d) and normalised-key decoder (S*d, d) of one group (see the module docstring).

    unit_moment: (S*d)² moment of the sources' unit keys u_s = P k_s / r_s (the normalised keys before the norm
    weight, so dims whose weight is 0 still count in the RMS); pair_energy: (S, pairs) normalised query energy per
    source; rms: (S,) r_s; weight: (S, d) effective norm weights. The new head keeps weight[0], times ρ.
    """
    n_src, d, r = pair_energy.shape[0], head_dim, rotary_dim
    f64 = torch.float64
    re, im, ps = rope.pair_dims(d, r)
    w_flat = weight.reshape(-1)
    read = w_flat[:, None] * unit_moment * w_flat[None, :]  # moment of what attention reads, w ⊙ u
    sign = torch.ones(n_src, d, dtype=f64)
    if len(re):
        ref = rope.complex_moment(read, n_src, d, r)[:, :, 0].real.T  # (S, pairs): Re E[z_s conj(z_0)]
        pair_sign = torch.where(ref < 0, -1.0, 1.0).to(f64)
        sign[:, re], sign[:, im] = pair_sign, pair_sign
    if len(ps):
        pass_ref = read.reshape(n_src, d, n_src, d)[:, :, 0, :].diagonal(dim1=-2, dim2=-1)[:, ps]  # (S, p)
        sign[:, ps] = torch.where(pass_ref < 0, -1.0, 1.0).to(f64)
    lam = torch.full((n_src, d), 1.0 / n_src, dtype=f64)
    if len(re):
        w = pair_energy + EPS * pair_energy.mean().clamp(min=EPS)
        share = w / w.sum(0, keepdim=True)
        lam[:, re], lam[:, im] = share, share
    # merged unit key k'_u = sum_s (λ σ w_s / w_0)_s ⊙ u_s, so w_0 ⊙ k'_u = sum_s λ_s σ_s ⊙ (w_s ⊙ u_s) = ŷ
    ok = weight[0].abs() > 1e-8 * weight[0].abs().max().clamp(min=EPS)
    ratio = torch.where(ok, weight / torch.where(ok, weight[0], torch.ones_like(weight[0])), torch.ones_like(weight))
    unit_mix = lam * sign * ratio
    mixer = torch.cat([torch.diag(unit_mix[s]) for s in range(n_src)], dim=1)
    rho = float(((mixer @ unit_moment @ mixer.T).diagonal().sum() / d).clamp(min=EPS).sqrt())
    enc_pre = torch.cat([torch.diag(unit_mix[s] * rms[0] / rms[s]) for s in range(n_src)], dim=1)
    dec = torch.cat([rho * torch.diag(sign[s]) for s in range(n_src)], dim=0)
    return enc_pre, dec


def with_norm_key_maps(merge, enc: torch.Tensor, dec: torch.Tensor):
    """`merge` (a HeadMerge) with its key maps replaced; value maps and recorded losses kept."""
    return replace(merge, key_encoder=enc, key_decoder=dec)
