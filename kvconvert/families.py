"""Model families as data: tensor names, attention geometry and the attention-input module, in one registry."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig

from kvconvert.errors import KVConvertError

PROJECTIONS = ("q", "k", "v", "o")


@dataclass(frozen=True)
class AttentionGeometry:
    """Shapes of one model's attention, identical in every layer."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int

    @property
    def n_rep(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V cache one token takes over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def with_kv_heads(self, n: int) -> AttentionGeometry:
        return AttentionGeometry(self.hidden_size, self.num_layers, self.num_heads, n, self.head_dim, self.rotary_dim)


@dataclass(frozen=True)
class Family:
    """One model family: how its attention tensors are named and where RoPE applies."""

    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    layer_prefix: str = "model.layers.{layer}.self_attn."
    proj_names: tuple[str, str, str, str] = ("q_proj", "k_proj", "v_proj", "o_proj")
    layers_path: str = "model.layers"
    kv_heads_key: str = "num_key_value_heads"
    embed_name: str = "model.embed_tokens.weight"
    lm_head_name: str = "lm_head.weight"
    partial_rotary: bool = False  # True where the family honours config.partial_rotary_factor

    def tensor_name(self, layer: int, proj: str, kind: str = "weight") -> str:
        """Checkpoint name of projection `proj` (one of q, k, v, o) in `layer`."""
        module = self.proj_names[PROJECTIONS.index(proj)]
        return f"{self.layer_prefix.format(layer=layer)}{module}.{kind}"

    def geometry(self, config: PretrainedConfig) -> AttentionGeometry:
        n_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        n_kv = getattr(config, self.kv_heads_key, None) or n_heads
        return AttentionGeometry(
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=n_heads,
            num_kv_heads=n_kv,
            head_dim=head_dim,
            rotary_dim=rotary_dim(config, head_dim) if self.partial_rotary else head_dim,
        )

    def attention_input_module(self, decoder_layer):
        """The module of a decoder layer whose input is the attention input (the normed hidden state)."""
        attn = decoder_layer
        for part in self.layer_prefix.split("{layer}.")[1].strip(".").split("."):
            attn = getattr(attn, part)
        return getattr(attn, self.proj_names[0])


def rotary_dim(config: PretrainedConfig, head_dim: int) -> int:
    """Number of leading head dims RoPE rotates (pairs j, j + rotary_dim/2); the rest pass unrotated."""
    params = getattr(config, "rope_parameters", None) or {}
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
    dim = int(head_dim * factor)
    return dim - dim % 2


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("LlamaForCausalLM",), ("llama",)),
    Family("mistral", ("MistralForCausalLM",), ("mistral",)),
    Family("qwen2", ("Qwen2ForCausalLM",), ("qwen2",)),
)


def supported_architectures() -> list[str]:
    return [arch for fam in FAMILIES for arch in fam.architectures]


def family_for(config: PretrainedConfig) -> Family:
    """The registered family of `config`, or a clear error naming the supported ones."""
    archs = tuple(getattr(config, "architectures", None) or ())
    for fam in FAMILIES:
        if any(a in fam.architectures for a in archs):
            return fam
    if not archs:
        for fam in FAMILIES:
            if config.model_type in fam.model_types:
                return fam
    found = ", ".join(archs) or config.model_type
    raise KVConvertError(f"unsupported model family {found}; supported: {', '.join(supported_architectures())}")
