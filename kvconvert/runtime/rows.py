"""The batch-row operations that `generate()` asks of a cache layer (beam search, batch expansion, offloading), for
layers that hold their tensors in their own layout: each layer says how to apply a function to all of them."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import CacheLayerMixin


class RowsLayer(CacheLayerMixin):
    """A `CacheLayerMixin` whose row operations go through `_map` (the mixin's own move `keys/values` only)."""

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every tensor the layer holds (batch first) by `fn` of it."""
        raise NotImplementedError

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i becomes row beam_idx[i]."""
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def offload(self) -> None:
        if self.is_initialized:
            self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized:
            self._map(lambda t: t.to(self.device, non_blocking=True))
