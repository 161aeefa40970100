"""The RazorAttention cache policy: which KV heads keep every token, and what the others keep (pure arithmetic)."""

from __future__ import annotations

from dataclasses import dataclass, field

PROMPT_ATTENTION = ("window", "full")


@dataclass(frozen=True)
class RazorPolicy:
    """Retrieval KV heads keep every token; the other heads keep `sinks` first tokens, the last `window(T)` tokens
    and (with `compensation`) one token holding the mean of the keys and values they dropped.

    `retrieval[layer]` lists the layer's retrieval KV heads. `head_fraction[layer][head]` (optional) gives each
    windowed KV head its own window fraction instead of `window_fraction` (tiers: wider windows for heads that
    matter more). `fixed_window[layer]` (sliding-window layers of models such as Gemma 3) makes every head of
    that layer keep exactly its last `fixed_window` tokens, as the model itself attends to no more.

    `prompt_attention` says what the tokens of a prompt chunk (more than one token per update) see in windowed
    heads: "window" (each token its own recent window and the sinks, as DuoAttention's streaming heads: what it
    would see if decoded, except that the compensation token is read as the chunk found it) or "full"
    (everything the head holds plus the whole chunk, causally, before the chunk is evicted: with the prompt in
    one chunk this is RazorAttention's own order, full attention over the prompt and the cache compressed after
    it). Decoding one token at a time is the same in both.
    """

    retrieval: tuple[tuple[int, ...], ...]
    num_kv_heads: int
    head_dim: int
    sinks: int = 4
    window_floor: int = 256
    window_fraction: float = 0.1
    compensation: bool = True
    fixed_window: tuple[int | None, ...] = field(default=())
    head_fraction: tuple[tuple[float, ...], ...] = field(default=())
    compensation_bias: bool = False  # attend to the compensation token as to the `dropped` tokens it stands for
    prompt_attention: str = "full"

    def __post_init__(self) -> None:
        if self.head_fraction:
            object.__setattr__(self, "head_fraction", tuple(tuple(map(float, row)) for row in self.head_fraction))
            if len(self.head_fraction) != len(self.retrieval) or any(
                len(row) != self.num_kv_heads or not all(0 <= f <= 1 for f in row) for row in self.head_fraction
            ):
                raise ValueError("head_fraction needs one fraction in [0, 1] per KV head of every layer")
        if not self.fixed_window:
            object.__setattr__(self, "fixed_window", (None,) * len(self.retrieval))
        if len(self.fixed_window) != len(self.retrieval):
            raise ValueError("fixed_window needs one entry per layer")
        if self.prompt_attention not in PROMPT_ATTENTION:
            raise ValueError(f"prompt_attention is one of {', '.join(PROMPT_ATTENTION)}, not {self.prompt_attention!r}")
        if self.sinks < 0 or self.window_floor < 1 or not 0 <= self.window_fraction <= 1:
            raise ValueError("sinks >= 0, window floor >= 1 and 0 <= window fraction <= 1")
        for heads in self.retrieval:
            if any(not 0 <= h < self.num_kv_heads for h in heads) or len(set(heads)) != len(heads):
                raise ValueError(f"retrieval heads {heads} outside 0..{self.num_kv_heads - 1} or repeated")

    @property
    def num_layers(self) -> int:
        return len(self.retrieval)

    def layer_rule(self, layer: int) -> tuple[int, int, float, bool]:
        """(sinks, window floor, window fraction, compensation) of the windowed heads of `layer` (without
        `head_fraction`; with it, the fraction is each head's: `head_rule`)."""
        fixed = self.fixed_window[layer]
        if fixed is not None:
            return 0, fixed, 0.0, False
        return self.sinks, self.window_floor, self.window_fraction, self.compensation

    def head_rule(self, layer: int, head: int) -> tuple[int, int, float, bool]:
        """(sinks, window floor, window fraction, compensation) of KV head `head` of `layer` when windowed."""
        sinks, floor, fraction, comp = self.layer_rule(layer)
        if self.head_fraction and self.fixed_window[layer] is None:
            fraction = self.head_fraction[layer][head]
        return sinks, floor, fraction, comp

    def window_groups(self, layer: int) -> list[tuple[tuple[int, int, float, bool], list[int]]]:
        """The windowed KV heads of `layer` grouped by their rule (one group per distinct window), in head order."""
        groups: dict[tuple[int, int, float, bool], list[int]] = {}
        full = self.retrieval_of(layer)
        for h in range(self.num_kv_heads):
            if h not in full:
                groups.setdefault(self.head_rule(layer, h), []).append(h)
        return list(groups.items())

    def retrieval_of(self, layer: int) -> tuple[int, ...]:
        return () if self.fixed_window[layer] is not None else self.retrieval[layer]

    def windowed_tokens(self, layer: int, tokens: int, head: int | None = None) -> tuple[int, int, int]:
        """(sink, compensation, recent) tokens one windowed head of `layer` (`head`; default: the layer's rule)
        holds after `tokens` tokens."""
        sinks, floor, fraction, comp = self.layer_rule(layer) if head is None else self.head_rule(layer, head)
        sink = min(sinks, tokens)
        rest = tokens - sink
        recent = min(window(floor, fraction, tokens), rest)
        return sink, int(comp and rest > recent), recent

    def kept_tokens(self, layer: int, tokens: int) -> int:
        """Tokens held over all KV heads of `layer` (K or V, one sequence)."""
        full = self.retrieval_of(layer)
        held = (tokens if h in full else sum(self.windowed_tokens(layer, tokens, h)) for h in range(self.num_kv_heads))
        return sum(held)

    def kv_bytes(self, tokens: int, batch_size: int = 1, dtype_bytes: int = 2) -> int:
        """Bytes of keys and values the policy keeps after `tokens` tokens, all layers."""
        kept = sum(self.kept_tokens(i, tokens) for i in range(self.num_layers))
        return 2 * kept * self.head_dim * dtype_bytes * batch_size

    def full_kv_bytes(self, tokens: int, batch_size: int = 1, dtype_bytes: int = 2) -> int:
        """Bytes a full cache of every head would hold (the DynamicCache of a model without sliding layers)."""
        return 2 * self.num_layers * self.num_kv_heads * tokens * self.head_dim * dtype_bytes * batch_size

    def retrieval_fraction(self) -> float:
        full = sum(len(self.retrieval_of(i)) for i in range(self.num_layers))
        return full / (self.num_layers * self.num_kv_heads)


def window(floor: int, fraction: float, tokens: int) -> int:
    """Recent-window length after `tokens` tokens: max(floor, floor(fraction * tokens)); never shrinks."""
    return max(floor, int(fraction * tokens))
