"""Data objects shared by several stages, with no dependencies of their own: one layer's attention weights and the
table naming each projection tensor's field."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionWeights:
    """One layer's attention projections as stored (out_features, in_features); biases optional."""

    q_weight: torch.Tensor
    k_weight: torch.Tensor
    v_weight: torch.Tensor
    o_weight: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None


FIELDS: dict[tuple[str, str], str] = {
    ("q", "weight"): "q_weight",
    ("k", "weight"): "k_weight",
    ("v", "weight"): "v_weight",
    ("o", "weight"): "o_weight",
    ("q", "bias"): "q_bias",
    ("k", "bias"): "k_bias",
    ("v", "bias"): "v_bias",
}
"""(projection, kind) -> `AttentionWeights` field."""

KV_FIELDS = ("k_weight", "v_weight", "k_bias", "v_bias")
"""Fields whose leading dimension is num_kv_heads * head_dim (they shrink in a conversion)."""
