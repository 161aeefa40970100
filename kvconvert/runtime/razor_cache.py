"""`RazorCache`: a transformers `Cache` whose layers hold retrieval heads in full and window the other heads.

Each `RazorLayer` holds `full_k/full_v` (batch, retrieval heads, T, d) and, per `WindowGroup` (windowed heads
sharing one window rule), `k/v` (batch, heads, sink + compensation + recent, d), laid out
[sinks | compensation | recent]. Every update
writes one new tensor of exactly the kept size (as `DynamicLayer` does with `torch.cat`), so nothing larger is
kept alive. `update()` returns the retrieval heads' keys/values carrying a `RazorView` (attribute `razor_view`)
that the `razor` attention function reads: each window group's keys/values and masks for this step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from kvconvert.runtime.razor_policy import PROMPT_ATTENTION, RazorPolicy, window
from kvconvert.runtime.rows import RowsLayer


@dataclass
class RazorView:
    """What one attention call needs beyond the retrieval heads' keys/values (returned by `update`)."""

    full_q: torch.Tensor  # query-head indices reading retrieval KV heads
    full_k: torch.Tensor
    full_v: torch.Tensor
    full_mask: torch.Tensor | None  # (q, keys) bool, True = attend; None: every key
    windowed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]  # (q idx, k, v, mask)


def _query_heads(kv_heads: list[int], group: int, device) -> torch.Tensor:
    return torch.tensor([h * group + j for h in kv_heads for j in range(group)], dtype=torch.long, device=device)


class WindowGroup:
    """The windowed KV heads of one layer that share one rule: tensors `k/v` (batch, heads, sink + compensation +
    recent, d), laid out [sinks | compensation | recent]. A `sliding` group is a sliding-window layer of the
    model itself (Gemma 3's local layers): every query attends through that window, in every prompt mode, as the
    model does."""

    def __init__(
        self,
        heads: list[int],
        rule: tuple[int, int, float, bool],
        bias: bool = False,
        prompt: str = "full",
        sliding: bool = False,
    ):
        self.heads = heads
        self.sinks, self.floor, self.fraction, self.compensation = rule
        self.bias = bias  # add log(dropped) to the compensation token's attention logit
        self.prompt = prompt  # "window": a chunk's tokens see their own windows; "full": all held + the chunk
        self.sliding = sliding
        self.n_sink = self.n_comp = self.n_recent = 0
        self.dropped = 0  # tokens folded into the compensation token

    def init(self, key_states: torch.Tensor, value_states: torch.Tensor, group: int) -> None:
        self.device = key_states.device
        b, _, _, d = key_states.shape
        self.k = key_states.new_empty(b, len(self.heads), 0, d)
        self.v = value_states.new_empty(b, len(self.heads), 0, value_states.shape[-1])
        self.kv = torch.tensor(self.heads, dtype=torch.long, device=self.device)
        self.q = _query_heads(self.heads, group, self.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, start: int, seen: int):
        """Store the new tokens (positions `start`..`seen`), evict; return (q idx, keys, values, mask) to attend."""
        new_k, new_v = key_states.index_select(1, self.kv), value_states.index_select(1, self.kv)
        q = seen - start
        k = v = mask = None
        if q > 1:  # prefill chunk: attend before evicting (each query through its own window, or to all held)
            k, v = torch.cat([self.k, new_k], dim=-2), torch.cat([self.v, new_v], dim=-2)
            mask = self._biased(self._window_mask(start, q), new_k.dtype)
        self._evict(new_k, new_v, seen)
        if q == 1:  # decode: the new token is in the window; every held token is visible
            k, v = self.k, self.v
            if self.bias and self.n_comp:
                mask = self._biased(torch.ones(1, k.shape[-2], dtype=torch.bool, device=self.device), k.dtype)
        return self.q, k, v, mask

    def _biased(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """With `bias` and a compensation token held: the float mask (0 / -inf) plus log(dropped) on its column,
        so the token weighs as the dropped tokens would if their keys were equal; else `mask` unchanged."""
        if not (self.bias and self.n_comp):
            return mask
        out = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        out[:, self.n_sink] += math.log(self.dropped)
        return out

    def _held_positions(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Absolute positions of the held tokens (compensation: -1) and which are always visible."""
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

    def _window_mask(self, start: int, q: int) -> torch.Tensor:
        """(q, held + q) mask: sinks and the compensation token always; other keys within the query's window."""
        held_pos, held_pinned = self._held_positions(start)
        new_pos = torch.arange(start, start + q, device=self.device)
        key_pos = torch.cat([held_pos, new_pos])
        pinned = torch.cat([held_pinned, new_pos < self.sinks])
        qpos = new_pos[:, None]
        if self.prompt == "full" and not self.sliding:
            return key_pos[None, :] <= qpos
        widths = ((new_pos + 1).double() * self.fraction).floor().long().clamp(min=self.floor)
        in_window = key_pos[None, :] > qpos - widths[:, None]
        return (key_pos[None, :] <= qpos) & (pinned[None, :] | in_window)

    def _evict(self, new_k: torch.Tensor, new_v: torch.Tensor, seen: int) -> None:
        """Append the new tokens, fold what leaves the window into the compensation token."""
        q = new_k.shape[-2]
        to_sink = max(0, min(self.sinks - self.n_sink, q))
        keep = min(window(self.floor, self.fraction, seen), seen - self.n_sink - to_sink)
        drop = self.n_recent + (q - to_sink) - keep
        drop_old, drop_new = min(drop, self.n_recent), max(0, drop - self.n_recent)
        s, c = self.n_sink, self.n_comp
        parts_k = [self.k[..., :s, :], new_k[..., :to_sink, :]]
        parts_v = [self.v[..., :s, :], new_v[..., :to_sink, :]]
        if drop and self.compensation:
            dropped_k = [self.k[..., s + c : s + c + drop_old, :], new_k[..., to_sink : to_sink + drop_new, :]]
            dropped_v = [self.v[..., s + c : s + c + drop_old, :], new_v[..., to_sink : to_sink + drop_new, :]]
            parts_k.append(self._fold(self.k[..., s : s + c, :], dropped_k, drop))
            parts_v.append(self._fold(self.v[..., s : s + c, :], dropped_v, drop))
            self.dropped += drop
            self.n_comp = 1
        elif c:
            parts_k.append(self.k[..., s : s + c, :])
            parts_v.append(self.v[..., s : s + c, :])
        parts_k += [self.k[..., s + c + drop_old :, :], new_k[..., to_sink + drop_new :, :]]
        parts_v += [self.v[..., s + c + drop_old :, :], new_v[..., to_sink + drop_new :, :]]
        self.k, self.v = torch.cat(parts_k, dim=-2), torch.cat(parts_v, dim=-2)
        self.n_sink += to_sink
        self.n_recent = keep

    def _fold(self, comp: torch.Tensor, dropped: list[torch.Tensor], n: int) -> torch.Tensor:
        """Running mean: (old mean * old count + sum of the newly dropped) / new count, accumulated in float32."""
        total = sum(t.float().sum(dim=-2, keepdim=True) for t in dropped)
        if comp.shape[-2]:
            total = total + comp.float() * self.dropped
        return (total / (self.dropped + n)).to(comp.dtype)


class RazorLayer(RowsLayer):
    """One layer's cache under a `RazorPolicy`: the retrieval heads in full, the others in `WindowGroup`s (one per
    distinct window rule; one group unless the policy gives heads their own window fractions)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, policy: RazorPolicy, layer_idx: int, num_query_heads: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.full_heads = list(policy.retrieval_of(layer_idx))
        self.policy = policy
        self.groups = self._new_groups()
        self.group = num_query_heads // policy.num_kv_heads
        self.seen = 0  # tokens this layer has been given

    def _new_groups(self) -> list[WindowGroup]:
        extra = self.policy.compensation_bias, self.policy.prompt_attention
        sliding = self.policy.fixed_window[self.layer_idx] is not None
        return [WindowGroup(heads, rule, *extra, sliding) for rule, heads in self.policy.window_groups(self.layer_idx)]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, _, _, d = key_states.shape
        nf = len(self.full_heads)
        self.full_k = key_states.new_empty(b, nf, 0, d)
        self.full_v = value_states.new_empty(b, nf, 0, value_states.shape[-1])
        self.keys, self.values = self.full_k, self.full_v
        self.full_kv = torch.tensor(self.full_heads, dtype=torch.long, device=self.device)
        self.full_q = _query_heads(self.full_heads, self.group, self.device)
        for g in self.groups:
            g.init(key_states, value_states, self.group)
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
        windowed = [g.update(key_states, value_states, start, self.seen) for g in self.groups]
        self.keys, self.values = self.full_k, self.full_v
        view = RazorView(self.full_q, self.full_k, self.full_v, full_mask, windowed)
        keys, values = self.full_k.view_as(self.full_k), self.full_v.view_as(self.full_v)
        keys.razor_view = view  # a fresh alias per call: the view (and any prefill temporaries) dies with it
        return keys, values

    def _causal(self, start: int, q: int, key_pos: torch.Tensor) -> torch.Tensor:
        return key_pos[None, :] <= torch.arange(start, start + q, device=self.device)[:, None]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def tensors(self) -> list[torch.Tensor]:
        if not self.is_initialized:
            return []
        return [self.full_k, self.full_v] + [t for g in self.groups for t in (g.k, g.v)]

    def reset(self) -> None:
        self.is_initialized = False
        self.keys = self.values = None
        self.seen = 0
        self.groups = self._new_groups()

    def _map(self, fn) -> None:
        """`fn` on every held tensor: the retrieval heads' and each window group's (rows are batch entries; all rows
        hold the same positions, so the groups' counters stay as they are). The mixin's row operations moved
        `keys/values` only, which the next update replaced, and never the window groups: beams silently kept
        their old caches."""
        if not self.is_initialized:
            return
        self.full_k, self.full_v = fn(self.full_k), fn(self.full_v)
        self.keys, self.values = self.full_k, self.full_v
        for g in self.groups:
            g.k, g.v = fn(g.k), fn(g.v)

    def crop(self, tokens_to_remove: int) -> None:
        """Refused: windowed heads have folded tokens into their compensation token and dropped them, so the cache
        cannot take tokens back (transformers' assisted and prompt-lookup decoding call this without asking)."""
        raise ValueError(
            "the RazorAttention cache cannot take tokens back (its windowed heads have dropped them); assisted, "
            "speculative or prompt-lookup decoding needs a cache that keeps every token"
        )


class RazorCache(Cache):
    """A `Cache` of `RazorLayer`s for a model with `num_query_heads` attention heads."""

    def __init__(self, policy: RazorPolicy, num_query_heads: int):
        super().__init__(layers=[RazorLayer(policy, i, num_query_heads) for i in range(policy.num_layers)])
        self.policy = policy

    def set_prompt_attention(self, mode: str) -> None:
        """Change how later prompt chunks attend in windowed heads ("window" or "full", see `RazorPolicy`): e.g.
        a prompt read with "full", then text scored with "window" exactly as if it were decoded token by token."""
        if mode not in PROMPT_ATTENTION:
            raise ValueError(f"prompt attention is one of {', '.join(PROMPT_ATTENTION)}, not {mode!r}")
        for layer in self.layers:
            for g in layer.groups:
                g.prompt = mode

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
