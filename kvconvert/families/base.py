"""A model family as data: where its attention lives, how its projections are stored, its rotary and QK-norm."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from transformers import PretrainedConfig

from kvconvert.families.layouts import SEPARATE, Layout, Weights
from kvconvert.families.norms import QKNorm


@dataclass(frozen=True)
class AttentionGeometry:
    """Shapes of one model's attention, identical in every layer, and its (optional) QK-norm."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    qk_norm: QKNorm | None = None

    @property
    def n_rep(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V cache one token takes over all layers (every layer keeping every token)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def with_kv_heads(self, n: int) -> AttentionGeometry:
        return replace(self, num_kv_heads=n)


def rotary_dim(config: PretrainedConfig, head_dim: int) -> int:
    """Number of leading head dims RoPE rotates (pairs j, j + rotary_dim/2); the rest pass unrotated."""
    params = getattr(config, "rope_parameters", None) or {}
    if "partial_rotary_factor" not in params and isinstance(next(iter(params.values()), None), dict):
        params = next(iter(params.values()))  # per layer type (Gemma 3): the factor is the same for all
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
    dim = int(head_dim * factor)
    return dim - dim % 2


@dataclass(frozen=True)
class Family:
    """One model family: its attention module, projection layout, rotary layout and QK-norm, as data.

    `attention` is the attention module's path inside a decoder layer; `layout` reads and writes its projections;
    `interleaved_rope` marks families whose RoPE pairs dims (2j, 2j+1) (Cohere), read into the rotate_half order
    every merge uses and written back; `layer_kwargs` are extra keyword arguments its decoder layer needs;
    `refuse(config)` returns a reason when a particular configuration cannot be converted.
    """

    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    layout: Layout = SEPARATE
    layers_path: str = "model.layers"
    attention: str = "self_attn"
    kv_heads_key: str = "num_key_value_heads"
    embed_name: str = "model.embed_tokens.weight"
    lm_head_name: str = "lm_head.weight"
    partial_rotary: bool = False  # True where the family honours config.partial_rotary_factor
    qk_norm: QKNorm | None = None
    interleaved_rope: bool = False
    layer_kwargs: dict = field(default_factory=dict)
    refuse: Callable[[PretrainedConfig], str | None] | None = None
    cache_heads: str = "kv"  # "query" where transformers caches keys broadcast to every query head (Falcon)

    def __hash__(self) -> int:
        return hash(self.name)

    # -- names ---------------------------------------------------------------------------------------------
    def prefix(self, layer: int) -> str:
        """Checkpoint name prefix of layer `layer`'s attention module, e.g. `model.layers.3.self_attn.`."""
        return f"{self.layers_path}.{layer}.{self.attention}."

    def tensor_name(self, layer: int, proj: str, kind: str = "weight") -> str:
        """Checkpoint name of projection `proj` (q, k, v, o) in `layer` (separate layouts only)."""
        return self.prefix(layer) + self.layout.module_of(proj) + f".{kind}"

    def weight_names(self, layer: int) -> list[str]:
        """The projection weights every checkpoint of this family has for `layer`."""
        return [self.prefix(layer) + n for n in self.layout.weight_names()]

    def norm_names(self, layer: int) -> list[str]:
        return [] if self.qk_norm is None else [self.prefix(layer) + n for n in self.qk_norm.names()]

    def attention_names(self, layer: int, present: Callable[[str], bool]) -> list[str]:
        """Every attention tensor of `layer` in a checkpoint (weights, the biases it has, QK-norm weights)."""
        optional = [self.prefix(layer) + n for n in self.layout.bias_names()] + self.norm_names(layer)
        return self.weight_names(layer) + [n for n in optional if present(n)]

    def projection_modules(self) -> tuple[str, ...]:
        """Names of the linear modules inside the attention module (what `heal --train attn` trains)."""
        return self.layout.modules()

    # -- geometry ------------------------------------------------------------------------------------------
    def geometry(self, config: PretrainedConfig) -> AttentionGeometry:
        n_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        n_kv = getattr(config, self.kv_heads_key, None) or n_heads
        norm = self.qk_norm if self.qk_norm is not None and self.qk_norm.enabled(config) else None
        return AttentionGeometry(
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=n_heads,
            num_kv_heads=n_kv,
            head_dim=head_dim,
            rotary_dim=rotary_dim(config, head_dim) if self.partial_rotary else head_dim,
            qk_norm=norm,
        )

    def attention_module(self, decoder_layer):
        """The attention module of a decoder layer (its input is the attention input, the normed hidden state)."""
        return decoder_layer.get_submodule(self.attention)

    # -- reading and writing -------------------------------------------------------------------------------
    def read(self, tensors: dict[str, torch.Tensor], geom: AttentionGeometry) -> Weights:
        """Projections from one layer's attention tensors keyed by their name inside the attention module."""
        w = self.layout.read(tensors, geom)
        if geom.qk_norm is not None:
            w = replace(w, q_norm=tensors[self.qk_norm.q], k_norm=tensors[self.qk_norm.k])
        return _permute_pairs(w, geom, inverse=False) if self.interleaved_rope else w

    def write(self, w: Weights, geom: AttentionGeometry) -> dict[str, torch.Tensor]:
        """Inverse of `read`: tensors keyed by their name inside the attention module, in the family's layout."""
        if self.interleaved_rope:
            w = _permute_pairs(w, geom, inverse=True)
        out = self.layout.write(w, geom)
        if geom.qk_norm is not None:
            out[self.qk_norm.q], out[self.qk_norm.k] = w.q_norm, w.k_norm
        return out


def _permute_pairs(w: Weights, geom: AttentionGeometry, inverse: bool) -> Weights:
    """Reorder every q/k head's dims between interleaved pairs (2j, 2j+1) and rotate_half pairs (j, j + r/2)."""
    d, r = geom.head_dim, geom.rotary_dim
    order = torch.cat([torch.arange(0, r, 2), torch.arange(1, r, 2), torch.arange(r, d)])
    perm = torch.argsort(order) if inverse else order

    def heads(t: torch.Tensor | None, per_head_rows: bool = True) -> torch.Tensor | None:
        if t is None:
            return None
        if t.dim() == 1 and t.shape[0] == d:
            return t[perm]
        n = t.shape[0] // d if per_head_rows else t.shape[0]
        return t.reshape(n, d, *t.shape[1 if per_head_rows else 2 :])[:, perm].reshape(t.shape)

    return replace(
        w,
        q_weight=heads(w.q_weight),
        k_weight=heads(w.k_weight),
        q_bias=heads(w.q_bias),
        k_bias=heads(w.k_bias),
        q_norm=None if w.q_norm is None else heads(w.q_norm, w.q_norm.dim() == 1),
        k_norm=None if w.k_norm is None else heads(w.k_norm, w.k_norm.dim() == 1),
    )


def resized(w: Weights, geom: AttentionGeometry, n_new: int) -> Weights:
    """Empty (meta) weights shaped as after merging to `n_new` KV heads: what the converted checkpoint holds."""
    d = geom.head_dim

    def meta(t: torch.Tensor | None, *shape: int) -> torch.Tensor | None:
        return None if t is None else torch.empty(*shape, dtype=t.dtype, device="meta")

    k_norm = w.k_norm
    if k_norm is not None and geom.qk_norm is not None and geom.qk_norm.scope != "head":
        k_norm = meta(k_norm, *((n_new * d,) if geom.qk_norm.scope == "all" else (n_new, d)))
    return replace(
        w,
        k_weight=meta(w.k_weight, n_new * d, w.k_weight.shape[1]),
        v_weight=meta(w.v_weight, n_new * d, w.v_weight.shape[1]),
        k_bias=meta(w.k_bias, n_new * d),
        v_bias=meta(w.v_bias, n_new * d),
        k_norm=k_norm,
    )


def converted_tensors(fam: Family, layer: int, w: Weights, geom: AttentionGeometry) -> dict[str, torch.Tensor]:
    """Checkpoint names and tensors of one converted layer's attention (`geom`: the converted geometry)."""
    prefix = fam.prefix(layer)
    return {prefix + name: t for name, t in fam.write(w, geom).items()}


def converted_shapes(fam: Family, layer: int, shapes: dict[str, list[int]], geom: AttentionGeometry, n_new: int):
    """Checkpoint name -> shape of one layer's attention tensors after merging to `n_new` KV heads."""
    prefix = fam.prefix(layer)
    old = fam.read({n[len(prefix) :]: torch.empty(s, device="meta") for n, s in shapes.items()}, geom)
    return {
        n: list(t.shape)
        for n, t in converted_tensors(fam, layer, resized(old, geom, n_new), geom.with_kv_heads(n_new)).items()
    }
