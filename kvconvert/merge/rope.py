"""RoPE-exact bookkeeping: rotary pairs as complex numbers, and complex maps as real matrices.

With `rotate_half`, dim j pairs with j + rotary_dim/2 and the pair rotates by its own frequency, i.e. it is
multiplied by exp(i*theta*t) when read as the complex number k_j + i*k_{j+r/2}. A map on keys commutes with RoPE
iff it acts on every pair as one complex scalar per (output, input) head and never mixes pairs.
"""

from __future__ import annotations

import torch


def pair_dims(head_dim: int, rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(real dims, imaginary dims, unrotated dims) of one head."""
    half = rotary_dim // 2
    re = torch.arange(half)
    return re, re + half, torch.arange(rotary_dim, head_dim)


def complex_moment(cov: torch.Tensor, n_src: int, head_dim: int, rotary_dim: int) -> torch.Tensor:
    """Per-pair Hermitian moments E[z zᴴ] of shape (pairs, n_src, n_src) from the real key moment of n_src heads."""
    re, im, _ = pair_dims(head_dim, rotary_dim)
    x = cov.reshape(n_src, head_dim, n_src, head_dim).permute(1, 3, 0, 2)  # [i, j, s, t]
    aa, bb = x[re, re], x[im, im]
    ba, ab = x[im, re], x[re, im]
    return torch.complex(aa + bb, ba - ab)


def complex_mean(mean: torch.Tensor, n_src: int, head_dim: int, rotary_dim: int) -> torch.Tensor:
    """Per-pair complex means, shape (pairs, n_src)."""
    re, im, _ = pair_dims(head_dim, rotary_dim)
    m = mean.reshape(n_src, head_dim)
    return torch.complex(m[:, re], m[:, im]).T


def pass_block(mat: torch.Tensor, n_src: int, head_dim: int, rotary_dim: int) -> torch.Tensor:
    """The unrotated-dims block of a (n_src*head_dim)² moment, shape (n_src*p, n_src*p)."""
    _, _, ps = pair_dims(head_dim, rotary_dim)
    idx = (torch.arange(n_src)[:, None] * head_dim + ps[None, :]).reshape(-1)
    return mat[idx][:, idx]


def real_maps(
    enc: torch.Tensor,
    dec: torch.Tensor,
    head_dim: int,
    rotary_dim: int,
    pass_enc: torch.Tensor | None = None,
    pass_dec: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Real encoder (d, S*d) and decoder (S*d, d) from per-pair complex coefficients.

    `enc` (pairs, S): merged pair = sum_s conj(enc_s) * z_s. `dec` (pairs, S): z_s ≈ dec_s * merged pair.
    `pass_enc` (p, S*p) and `pass_dec` (S*p, p) map the unrotated dims, which may mix freely.
    """
    n_src = enc.shape[1]
    re, im, ps = pair_dims(head_dim, rotary_dim)
    e = torch.zeros(head_dim, n_src, head_dim, dtype=torch.float64)
    d = torch.zeros(n_src, head_dim, head_dim, dtype=torch.float64)
    er, ei = enc.real.T, enc.imag.T  # (S, pairs)
    dr, di = dec.real.T, dec.imag.T
    for s in range(n_src):
        e[re, s, re], e[re, s, im] = er[s], ei[s]
        e[im, s, im], e[im, s, re] = er[s], -ei[s]
        d[s, re, re], d[s, re, im] = dr[s], -di[s]
        d[s, im, re], d[s, im, im] = di[s], dr[s]
    if len(ps):
        p = len(ps)
        pe = pass_enc.reshape(p, n_src, p)
        pd = pass_dec.reshape(n_src, p, p)
        for s in range(n_src):
            e[ps[:, None], s, ps[None, :]] = pe[:, s, :]
            d[s, ps[:, None], ps[None, :]] = pd[s]
    return e.reshape(head_dim, n_src * head_dim), d.reshape(n_src * head_dim, head_dim)


def rotate(x: torch.Tensor, angles: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Apply RoPE with `rotate_half` convention: x (..., d) rotated by per-pair `angles` (pairs,)."""
    cos = torch.cat([angles.cos(), angles.cos()]).to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()]).to(x.dtype)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)


def pair_coherence(theta: float, rotary_dim: int, context: int) -> torch.Tensor:
    """Per pair, |mean over a context of exp(i*freq*t)|²: how constant a fixed key offset stays after RoPE.

    Softmax ignores a score offset shared by all keys; a constant pre-RoPE key offset is such an offset only
    where the pair barely rotates over the context (low frequencies), so that share of it can be discounted.
    """
    half = rotary_dim // 2
    freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / rotary_dim)
    x = freq * context / 2
    return torch.where(x > 1e-8, torch.sin(x) / x, torch.ones_like(x)) ** 2
