"""QK-norm as data: which norm a family applies to queries and keys after the projection, and over what.

scope `head`: one weight of head_dim shared by all heads, normalised per head (Qwen3, Gemma 3).
scope `heads`: one weight row per head, normalised per head (Cohere `use_qk_norm`).
scope `all`: one weight over the whole projection, normalised over all heads together (OLMo 2), so the key norm's
width changes with the KV-head count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

SCOPES = ("head", "heads", "all")


@dataclass(frozen=True)
class QKNorm:
    scope: str = "head"
    kind: str = "rms"  # rms, or layer (mean removed first; Cohere)
    offset: float = 0.0  # the norm multiplies by (offset + weight): Gemma stores weight - 1
    q: str = "q_norm.weight"
    k: str = "k_norm.weight"
    flag: str | None = None  # config attribute that switches the norm on (Cohere `use_qk_norm`)

    def enabled(self, config: PretrainedConfig) -> bool:
        return self.flag is None or bool(getattr(config, self.flag, False))

    def names(self) -> list[str]:
        return [self.q, self.k]

    def effective(self, stored: torch.Tensor) -> torch.Tensor:
        """The factor the norm multiplies by, from the stored weight."""
        return stored.to(torch.float64) + self.offset

    def stored(self, effective: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return (effective - self.offset).to(like.dtype)

    def per_head(self, stored: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
        """The effective weight as (n_heads, head_dim), whatever the scope."""
        eff = self.effective(stored)
        return eff.expand(n_heads, head_dim) if self.scope == "head" else eff.reshape(n_heads, head_dim)

    def from_heads(self, per_head: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Stored weight from per-head effective rows (scope `head`: their mean, one shared row)."""
        if self.scope == "head":
            return self.stored(per_head.mean(0), like)
        return self.stored(per_head.reshape(-1) if self.scope == "all" else per_head, like)
