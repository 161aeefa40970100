"""A conversion ready to write or check: source checkpoint, plan, and the final attention weights per layer."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

from transformers import PretrainedConfig

from kvconvert.checkpoint import Checkpoint
from kvconvert.fold import fold_layer
from kvconvert.merge.moments import AttentionWeights
from kvconvert.overlap import PendingPlan
from kvconvert.plan import CompressionPlan


@dataclass(frozen=True)
class Converted:
    """`attention(layer)` is the plan folded into the source weights, unless `overrides` (e.g. refined weights)
    supplies the layer's final projections. The plan may still be in progress (`PendingPlan`, for an export that
    overlaps decompose): a layer then waits for its own plan."""

    ckpt: Checkpoint
    plan: CompressionPlan | PendingPlan
    overrides: Callable[[int], AttentionWeights] | None = None

    def attention(self, layer: int) -> AttentionWeights:
        if self.overrides is not None:
            return self.overrides(layer)
        geom = self.ckpt.family.geometry(self.ckpt.config)
        return fold_layer(self.ckpt.attention(layer), self.plan.layer(layer), geom)

    @property
    def config(self) -> PretrainedConfig:
        """The source config with only the KV-head count changed."""
        config = copy.deepcopy(self.ckpt.config)
        setattr(config, self.ckpt.family.kv_heads_key, self.plan.num_kv_heads_after)
        return config
