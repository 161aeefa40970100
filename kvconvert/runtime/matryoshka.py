"""MatryoshkaKV cache runtime: a transformers `Cache` that stores each KV head's keys/values at its own rate.

Heads of one layer that share a (key rate, value rate) pair form a group; each group keeps one (B, n_g, T, r)
tensor for keys and one for values, so nothing is padded and one decoding step costs one projection, one SDPA call
and one decode per *group* (at most n_kv, usually 1-3), never a Python loop over all heads. The trade-off: more
distinct rates per layer mean more, smaller kernel calls; the search's rate step (default D/8) bounds that.

Use from Python:

    rt = matryoshka_runtime(model, "DIR")          # DIR holds matryoshka.safetensors
    rt.attach(model)                               # done by the factory too; idempotent
    out = model.generate(ids, past_key_values=rt.new_cache(model, ids.shape[0]), max_new_tokens=32)
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers.cache_utils import Cache

from kvconvert.errors import KVConvertError
from kvconvert.evaluation.kvcache import sliding_windows
from kvconvert.matryoshka.projections import Projections, load_projections
from kvconvert.runtime.matryoshka_attention import (
    NAME,
    GroupedStates,
    HeadProjections,
    attention_modules,
    project_keys_values,
    register,
)
from kvconvert.runtime.rows import RowsLayer


class MatryoshkaLayer(RowsLayer):
    """One layer's cache: per rate group, projected keys (B, n_g, T, r_k) and values (B, n_g, T, r_v).

    With a `sliding_window` (Gemma 3's local layers) it keeps only the last `sliding_window - 1` tokens, as
    transformers' DynamicSlidingWindowLayer does; each step still attends to those plus the new tokens."""

    is_croppable = True

    def __init__(self, proj: HeadProjections, sliding_window: int | None = None):
        super().__init__()
        self.proj = proj
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.group_keys: list[torch.Tensor] = []
        self.group_values: list[torch.Tensor] = []
        self.seen = 0  # tokens given to this layer (more than it holds once a window is full)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        groups = self.proj.groups(key_states.dtype)
        new = [project_keys_values(key_states, value_states, g) for g in groups]
        keys = [k for k, _ in new]
        values = [v for _, v in new]
        if self.group_keys:
            keys = [torch.cat([old, k], dim=-2) for old, k in zip(self.group_keys, keys, strict=True)]
            values = [torch.cat([old, v], dim=-2) for old, v in zip(self.group_values, values, strict=True)]
        q = key_states.shape[-2]
        self.seen += q
        self.group_keys, self.group_values = self._held(keys, q), self._held(values, q)
        return GroupedStates(keys, values), None

    def _held(self, states: list[torch.Tensor], q: int) -> list[torch.Tensor]:
        """What stays after this step: everything, or the window's last `sliding_window - 1` tokens (copied after a
        prompt chunk, so the chunk's storage is freed)."""
        keep = None if self.sliding_window is None else self.sliding_window - 1
        if keep is None or states[0].shape[-2] <= keep:
            return states
        return [t[..., -keep:, :].clone() if q > 1 else t[..., -keep:, :] for t in states]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.sliding_window is None:
            return self.seen + query_length, 0
        held = min(self.seen, self.sliding_window - 1)
        return held + query_length, self.seen - held

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1 if self.sliding_window is None else self.sliding_window

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.group_keys, *self.group_values))

    def reset(self) -> None:
        self.group_keys, self.group_values = [], []
        self.seen = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` tokens (a negative count, as transformers' DynamicLayer takes it)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, not {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.group_keys:
            return
        if self.group_keys[0].shape[-2] < self.seen:
            raise RuntimeError(
                "a sliding-window layer whose window is full cannot be cropped: it no longer holds "
                "the tokens that would be visible again"
            )
        self.group_keys = [t[..., :tokens_to_remove, :] for t in self.group_keys]
        self.group_values = [t[..., :tokens_to_remove, :] for t in self.group_values]
        self.seen = max(self.seen + tokens_to_remove, 0)

    def _map(self, fn) -> None:
        self.group_keys = [fn(t) for t in self.group_keys]
        self.group_values = [fn(t) for t in self.group_values]


class MatryoshkaCache(Cache):
    """A cache of projected keys/values, one `MatryoshkaLayer` per attention layer."""

    def __init__(self, projections: list[HeadProjections], windows: list[int | None] | None = None):
        windows = windows or [None] * len(projections)
        super().__init__(layers=[MatryoshkaLayer(p, w) for p, w in zip(projections, windows, strict=True)])

    def nbytes(self) -> int:
        """Bytes of every cached tensor."""
        return sum(layer.nbytes() for layer in self.layers)


class MatryoshkaRuntime:
    """`CacheRuntime` (see kvconvert/runtime/registry.py) for MatryoshkaKV projections."""

    name = NAME

    def __init__(self, projections: Projections, info: dict | None = None):
        self.projections = projections
        self.info = info or {}
        self.windows: list[int | None] = [None] * projections.shape[0]  # per layer; set by `attach`

    def attach(self, model) -> None:
        """Give every attention module its layer's `HeadProjections` and select the "matryoshka" attention."""
        register()
        mods = attention_modules(model)
        p = self.projections
        layers, n_kv, head_dim = p.shape
        if len(mods) != layers:
            raise ValueError(f"projections have {layers} layers, the model {len(mods)} attention layers")
        param = next(model.parameters())
        for i, m in enumerate(mods):
            if m.k_proj.out_features != n_kv * head_dim:
                raise ValueError(f"layer {i}: k_proj gives {m.k_proj.out_features} features, not {n_kv} x {head_dim}")
            hp = HeadProjections(p.key_basis[i], p.value_basis[i], p.key_rates[i], p.value_rates[i])
            m.matryoshka = hp.to(param.device)
        self.windows = sliding_windows(model.config)
        model.set_attn_implementation(NAME)

    def new_cache(self, model, batch_size: int = 1) -> MatryoshkaCache:
        mods = attention_modules(model)
        if not all(isinstance(getattr(m, "matryoshka", None), HeadProjections) for m in mods):
            self.attach(model)
        return MatryoshkaCache([m.matryoshka for m in mods], self.windows)

    def kv_bytes(self, tokens: int, batch_size: int = 1, dtype_bytes: int | None = None) -> int:
        """Computed cache bytes after `tokens` tokens: batch · dtype bytes · Σ_layer held tokens · Σ_head (r_k + r_v),
        where a sliding-window layer holds at most `window - 1` tokens."""
        size = dtype_bytes if dtype_bytes is not None else self.dtype_bytes
        per_layer = (self.projections.key_rates + self.projections.value_rates).sum(-1).tolist()
        held = [tokens if w is None else min(tokens, w - 1) for w in self.windows]
        return batch_size * size * sum(int(n) * t for n, t in zip(per_layer, held, strict=True))

    dtype_bytes = 4


def detach(model, attn_implementation: str = "sdpa") -> None:
    """Remove the projections from every attention module and select a stock attention again."""
    for m in attention_modules(model):
        if hasattr(m, "matryoshka"):
            del m.matryoshka
    model.set_attn_implementation(attn_implementation)


def matryoshka_runtime(model, arg: str | None) -> MatryoshkaRuntime:
    """Factory for `kvconvert eval --cache matryoshka:DIR`: DIR (or the model's own directory when no arg) holds
    matryoshka.safetensors. Attaches to `model`."""
    where = Path(arg) if arg else Path(getattr(model, "name_or_path", "") or ".")
    proj, info = load_projections(where)
    rt = MatryoshkaRuntime(proj, info)
    rt.dtype_bytes = next(model.parameters()).element_size()
    try:
        rt.attach(model)
    except ValueError as exc:  # projections of another model (other layer or KV-head count)
        raise KVConvertError(
            f"{where} does not fit this model ({exc}); run `kvconvert matryoshka` on this model"
        ) from None
    return rt
