"""`RazorCache`: a transformers `Cache` whose layers hold retrieval heads in full and window the other heads.

Each `RazorLayer` holds two pairs of tensors: `full_k/full_v` (batch, retrieval heads, T, d) and `win_k/win_v`
(batch, windowed heads, sink + compensation + recent, d), laid out [sinks | compensation | recent]. Every update
writes one new tensor of exactly the kept size (as `DynamicLayer` does with `torch.cat`), so nothing larger is
kept alive. `update()` returns the retrieval heads' keys/values carrying a `RazorView` (attribute `razor_view`)
that the `razor` attention function reads: the windowed heads' keys/values and masks for this step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvconvert.runtime.razor_policy import RazorPolicy, window


@dataclass
class RazorView:
    """What one attention call needs beyond the retrieval heads' keys/values (returned by `update`)."""

    full_q: torch.Tensor  # query-head indices reading retrieval KV heads
    win_q: torch.Tensor  # query-head indices reading windowed KV heads
    full_k: torch.Tensor
    full_v: torch.Tensor
    win_k: torch.Tensor
    win_v: torch.Tensor
    full_mask: torch.Tensor | None  # (q, keys) bool, True = attend; None: every key
    win_mask: torch.Tensor | None


def _query_heads(kv_heads: list[int], group: int, device) -> torch.Tensor:
    return torch.tensor([h * group + j for h in kv_heads for j in range(group)], dtype=torch.long, device=device)


class RazorLayer(CacheLayerMixin):
    """One layer's cache under a `RazorPolicy`."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, policy: RazorPolicy, layer_idx: int, num_query_heads: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.full_heads = list(policy.retrieval_of(layer_idx))
        self.win_heads = [h for h in range(policy.num_kv_heads) if h not in self.full_heads]
        self.group = num_query_heads // policy.num_kv_heads
        self.sinks, self.floor, self.fraction, self.compensation = policy.layer_rule(layer_idx)
        self.seen = 0  # tokens this layer has been given
        self.n_sink = self.n_comp = self.n_recent = 0
        self.dropped = 0  # tokens folded into the compensation token

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, _, _, d = key_states.shape
        dv = value_states.shape[-1]
        nf, nw = len(self.full_heads), len(self.win_heads)
        self.full_k, self.win_k = key_states.new_empty(b, nf, 0, d), key_states.new_empty(b, nw, 0, d)
        self.full_v, self.win_v = value_states.new_empty(b, nf, 0, dv), value_states.new_empty(b, nw, 0, dv)
        self.keys, self.values = self.full_k, self.full_v
        as_index = lambda hs: torch.tensor(hs, dtype=torch.long, device=self.device)  # noqa: E731
        self.full_kv, self.win_kv = as_index(self.full_heads), as_index(self.win_heads)
        self.full_q = _query_heads(self.full_heads, self.group, self.device)
        self.win_q = _query_heads(self.win_heads, self.group, self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store `q` new tokens, evict what the policy drops, return the keys/values this step attends to."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q, start = key_states.shape[-2], self.seen
        self.seen += q
        full_mask = None
        if self.full_heads:
            self.full_k = torch.cat([self.full_k, key_states.index_select(1, self.full_kv)], dim=-2)
            self.full_v = torch.cat([self.full_v, value_states.index_select(1, self.full_kv)], dim=-2)
            if q > 1:
                full_mask = self._causal(start, q, torch.arange(self.seen, device=self.device))
        win_k = win_v = win_mask = None
        if self.win_heads:
            new_k, new_v = key_states.index_select(1, self.win_kv), value_states.index_select(1, self.win_kv)
            if q > 1:  # prefill chunk: attend before evicting, each query through its own window
                win_k, win_v = torch.cat([self.win_k, new_k], dim=-2), torch.cat([self.win_v, new_v], dim=-2)
                win_mask = self._window_mask(start, q)
            self._evict(new_k, new_v)
            if q == 1:  # decode: the new token is in the window; every held token is visible
                win_k, win_v = self.win_k, self.win_v
        self.keys, self.values = self.full_k, self.full_v
        view = RazorView(self.full_q, self.win_q, self.full_k, self.full_v, win_k, win_v, full_mask, win_mask)
        keys, values = self.full_k.view_as(self.full_k), self.full_v.view_as(self.full_v)
        keys.razor_view = view  # a fresh alias per call: the view (and any prefill temporaries) dies with it
        return keys, values

    def _held_positions(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Absolute positions of the held windowed tokens (compensation: -1) and which are always visible."""
        dev = self.device
        pos = torch.cat(
            [
                torch.arange(self.n_sink, device=dev),
                torch.full((self.n_comp,), -1, device=dev),
                torch.arange(start - self.n_recent, start, device=dev),
            ]
        )
        pinned = torch.zeros_like(pos, dtype=torch.bool)
        pinned[: self.n_sink + self.n_comp] = True
        return pos, pinned

    def _causal(self, start: int, q: int, key_pos: torch.Tensor) -> torch.Tensor:
        return key_pos[None, :] <= torch.arange(start, start + q, device=self.device)[:, None]

    def _window_mask(self, start: int, q: int) -> torch.Tensor:
        """(q, held + q) mask: sinks and the compensation token always; other keys within the query's window."""
        held_pos, held_pinned = self._held_positions(start)
        new_pos = torch.arange(start, start + q, device=self.device)
        key_pos = torch.cat([held_pos, new_pos])
        pinned = torch.cat([held_pinned, new_pos < self.sinks])
        qpos = new_pos[:, None]
        widths = ((new_pos + 1).double() * self.fraction).floor().long().clamp(min=self.floor)
        in_window = key_pos[None, :] > qpos - widths[:, None]
        return (key_pos[None, :] <= qpos) & (pinned[None, :] | in_window)

    def _evict(self, new_k: torch.Tensor, new_v: torch.Tensor) -> None:
        """Append the new windowed-head tokens, fold what leaves the window into the compensation token."""
        q = new_k.shape[-2]
        to_sink = max(0, min(self.sinks - self.n_sink, q))
        keep = min(window(self.floor, self.fraction, self.seen), self.seen - self.n_sink - to_sink)
        drop = self.n_recent + (q - to_sink) - keep
        drop_old, drop_new = min(drop, self.n_recent), max(0, drop - self.n_recent)
        s, c = self.n_sink, self.n_comp
        parts_k = [self.win_k[..., :s, :], new_k[..., :to_sink, :]]
        parts_v = [self.win_v[..., :s, :], new_v[..., :to_sink, :]]
        if drop and self.compensation:
            dropped_k = [self.win_k[..., s + c : s + c + drop_old, :], new_k[..., to_sink : to_sink + drop_new, :]]
            dropped_v = [self.win_v[..., s + c : s + c + drop_old, :], new_v[..., to_sink : to_sink + drop_new, :]]
            comp_k = self._fold(self.win_k[..., s : s + c, :], dropped_k, drop)
            comp_v = self._fold(self.win_v[..., s : s + c, :], dropped_v, drop)
            parts_k.append(comp_k)
            parts_v.append(comp_v)
            self.dropped += drop
            self.n_comp = 1
        elif c:
            parts_k.append(self.win_k[..., s : s + c, :])
            parts_v.append(self.win_v[..., s : s + c, :])
        parts_k += [self.win_k[..., s + c + drop_old :, :], new_k[..., to_sink + drop_new :, :]]
        parts_v += [self.win_v[..., s + c + drop_old :, :], new_v[..., to_sink + drop_new :, :]]
        self.win_k, self.win_v = torch.cat(parts_k, dim=-2), torch.cat(parts_v, dim=-2)
        self.n_sink += to_sink
        self.n_recent = keep

    def _fold(self, comp: torch.Tensor, dropped: list[torch.Tensor], n: int) -> torch.Tensor:
        """Running mean: (old mean * old count + sum of the newly dropped) / new count, accumulated in float32."""
        total = sum(t.float().sum(dim=-2, keepdim=True) for t in dropped)
        if comp.shape[-2]:
            total = total + comp.float() * self.dropped
        return (total / (self.dropped + n)).to(comp.dtype)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.full_k, self.full_v, self.win_k, self.win_v)] if self.is_initialized else []

    def reset(self) -> None:
        self.is_initialized = False
        self.keys = self.values = None
        self.seen = self.n_sink = self.n_comp = self.n_recent = self.dropped = 0


class RazorCache(Cache):
    """A `Cache` of `RazorLayer`s for a model with `num_query_heads` attention heads."""

    def __init__(self, policy: RazorPolicy, num_query_heads: int):
        super().__init__(layers=[RazorLayer(policy, i, num_query_heads) for i in range(policy.num_layers)])
        self.policy = policy

    def tensor_bytes(self) -> int:
        """Bytes of the key/value tensors the cache holds (numel x element size)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())

    def storage_bytes(self) -> int:
        """Bytes of the distinct storages behind those tensors: what the cache really keeps allocated."""
        storages = {}
        for layer in self.layers:
            for t in layer.tensors():
                st = t.untyped_storage()
                storages[st.data_ptr()] = st.nbytes()
        return sum(storages.values())
