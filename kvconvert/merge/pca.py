"""Activation-aware low-rank fits from second moments: weighted real PCA and per-pair complex rank-1 PCA."""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-12


@dataclass(frozen=True)
class LowRankFit:
    """encoder (r, n) and regression decoder (n, r): x ≈ decoder @ encoder @ x; loss and total in the fit's metric."""

    encoder: torch.Tensor
    decoder: torch.Tensor
    loss: float
    total: float


def psd_sqrt(mat: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a positive semi-definite matrix (batched)."""
    vals, vecs = torch.linalg.eigh(mat)
    return (vecs * vals.clamp(min=0).sqrt().unsqueeze(-2)) @ vecs.transpose(-1, -2)


def regression_decoder(moment: torch.Tensor, encoder: torch.Tensor) -> torch.Tensor:
    """Least-squares decoder D minimising E||x - D E x||² given E[x xᵀ] (works for real or complex)."""
    cross = moment @ encoder.mH  # E[x yᴴ]
    gram = encoder @ cross  # E[y yᴴ]
    return cross @ torch.linalg.pinv(gram, hermitian=True)


def weighted_pca(moment: torch.Tensor, rank: int, sqrt_weight: torch.Tensor | None = None) -> LowRankFit:
    """Rank-`rank` fit minimising E[(x - x̂)ᵀ W (x - x̂)] with W = sqrt_weight², from the moment E[x xᵀ].

    The encoder rows are rescaled so every merged dim carries the mean energy of an input dim (keeps fp16/bf16
    ranges sane); the decoder absorbs the inverse scale.
    """
    w = sqrt_weight if sqrt_weight is not None else torch.eye(len(moment), dtype=moment.dtype)
    m = w @ moment @ w
    vals, vecs = torch.linalg.eigh(m)
    top = vecs[:, -rank:].flip(-1)
    encoder = top.T @ w
    encoder = _rescale_rows(encoder, moment)
    decoder = regression_decoder(moment, encoder)
    total = float(m.diagonal().sum())
    kept = float(vals[-rank:].clamp(min=0).sum())
    return LowRankFit(encoder, decoder, max(total - kept, 0.0), total)


def _rescale_rows(encoder: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    target = moment.diagonal().mean().clamp(min=EPS)
    energy = ((encoder @ moment) * encoder).sum(-1).clamp(min=EPS)
    return encoder * (target / energy).sqrt().unsqueeze(-1)


def complex_rank1(moment: torch.Tensor, weight: torch.Tensor | None = None) -> LowRankFit:
    """Per pair, one complex combination y = cᴴ z of the group's heads minimising sum_s w_s E|z_s - a_s y|².

    moment: (pairs, S, S) Hermitian E[z zᴴ]; weight: (pairs, S) non-negative, or None for uniform.
    Returns encoder c and decoder a as (pairs, S) complex tensors.
    """
    if weight is None:
        weight = torch.ones(moment.shape[:2], dtype=torch.float64)
    sw = (weight + EPS * weight.mean(-1, keepdim=True).clamp(min=EPS)).sqrt()
    m = sw.unsqueeze(-1) * moment * sw.unsqueeze(-2)
    vals, vecs = torch.linalg.eigh(m)
    c = sw * vecs[..., -1]
    energy = torch.einsum("ps,pst,pt->p", c.conj(), moment, c).real.clamp(min=EPS)
    target = moment.diagonal(dim1=-2, dim2=-1).real.mean(-1).clamp(min=EPS)
    c = c * (target / energy).sqrt().unsqueeze(-1)
    a = torch.einsum("pst,pt->ps", moment, c) / (target.unsqueeze(-1))
    total = float(m.diagonal(dim1=-2, dim2=-1).real.sum())
    kept = float(vals[..., -1].clamp(min=0).sum())
    return LowRankFit(c, a, max(total - kept, 0.0), total)
