"""Data objects shared by several stages, with no dependencies of their own: one layer's attention weights, the one
layout every family is read into and merges fold."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionWeights:
    """One layer's attention projections as stored (out_features, in_features); biases and QK-norm optional.

    Every family is read into this one layout: separate q/k/v/o, heads contiguous, RoPE pairs (j, j + r/2).
    `q_norm`/`k_norm` are the QK-norm weights as stored (shape per the family's `QKNorm.scope`).
    """

    q_weight: torch.Tensor
    k_weight: torch.Tensor
    v_weight: torch.Tensor
    o_weight: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
