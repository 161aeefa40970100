"""What a merge method works on and returns: one group's moments in, key and value encoder/decoder maps out."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


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


BatchedLoss = Callable[[Sequence[tuple[int, ...]]], list[tuple[float, float, float, float]]]
"""(key loss, key total, value loss, value total) of each group of whole KV heads of one layer."""


@dataclass(frozen=True)
class Method:
    """A merge method: its per-group `loss` (cheap, eigenvalues only), its full `merge`, and `batched`, which
    builds from one layer's moments (LayerMoments, geometry, pair coherence) a scorer of many groups at once
    (what the grouping search calls)."""

    name: str
    loss: Callable[[GroupProblem], MergeLoss]
    merge: Callable[[GroupProblem], HeadMerge]
    batched: Callable[..., BatchedLoss]
