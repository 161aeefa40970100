"""The family registry: every supported decoder family as one row of data, and the refused ones with a reason."""

from __future__ import annotations

from transformers import PretrainedConfig

from kvconvert.families.base import Family
from kvconvert.families.layouts import FALCON, PHI3, Separate
from kvconvert.families.norms import QKNorm

HEAD_RMS = QKNorm("head")
GEMMA_NORM = QKNorm("head", offset=1.0)
ALL_RMS = QKNorm("all")
COHERE_NORM = QKNorm("heads", kind="layer", flag="use_qk_norm")


def _falcon_cache_heads() -> str:
    """Before transformers 5.25 its Falcon attention cached keys and values already broadcast to every query head (a
    DynamicCache of num_attention_heads heads per layer); from 5.25 on it caches the KV heads, as other families do."""
    import transformers
    from packaging.version import Version

    return "query" if Version(transformers.__version__) < Version("5.25.0") else "kv"


def _falcon(config: PretrainedConfig) -> str | None:
    if getattr(config, "alibi", False):
        return "Falcon with ALiBi has no rotary embedding; kvconvert merges rotary (or unrotated) keys only"
    if not getattr(config, "new_decoder_architecture", False):
        return (
            "Falcon's old decoder architecture is either multi-query (already one KV head) or plain MHA with a "
            "per-head fused query_key_value that stock transformers cannot load with fewer KV heads"
        )
    return None


def _stablelm(config: PretrainedConfig) -> str | None:
    if getattr(config, "qk_layernorm", False):
        return "StableLM with qk_layernorm keeps one LayerNorm module per head, which is not supported yet"
    return None


def _phi(config: PretrainedConfig) -> str | None:
    if getattr(config, "qk_layernorm", False):
        return "Phi with qk_layernorm is not supported yet (no released checkpoint uses it)"
    return None


def _plain(name: str, arch: str, model_type: str, **kw) -> Family:
    return Family(name, (arch,), (model_type,), **kw)


FAMILIES: tuple[Family, ...] = (
    _plain("llama", "LlamaForCausalLM", "llama"),
    _plain("mistral", "MistralForCausalLM", "mistral"),
    _plain("qwen2", "Qwen2ForCausalLM", "qwen2"),
    _plain("mixtral", "MixtralForCausalLM", "mixtral"),
    _plain("qwen2_moe", "Qwen2MoeForCausalLM", "qwen2_moe"),
    _plain("qwen3", "Qwen3ForCausalLM", "qwen3", qk_norm=HEAD_RMS),
    _plain("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3_moe", qk_norm=HEAD_RMS),
    _plain("granite", "GraniteForCausalLM", "granite"),
    _plain("granitemoe", "GraniteMoeForCausalLM", "granitemoe"),
    _plain("starcoder2", "Starcoder2ForCausalLM", "starcoder2"),
    _plain("olmo", "OlmoForCausalLM", "olmo"),
    _plain("olmo2", "Olmo2ForCausalLM", "olmo2", qk_norm=ALL_RMS),
    _plain("olmo3", "Olmo3ForCausalLM", "olmo3", qk_norm=ALL_RMS),
    _plain("gemma", "GemmaForCausalLM", "gemma"),
    _plain("gemma2", "Gemma2ForCausalLM", "gemma2"),
    _plain("gemma3", "Gemma3ForCausalLM", "gemma3_text", qk_norm=GEMMA_NORM),
    _plain("helium", "HeliumForCausalLM", "helium", interleaved_rope=True),
    _plain("glm", "GlmForCausalLM", "glm", partial_rotary=True, interleaved_rope=True),
    _plain("exaone4", "Exaone4ForCausalLM", "exaone4", qk_norm=HEAD_RMS),
    _plain("cohere", "CohereForCausalLM", "cohere", qk_norm=COHERE_NORM, interleaved_rope=True),
    _plain("cohere2", "Cohere2ForCausalLM", "cohere2", interleaved_rope=True),
    _plain("phi", "PhiForCausalLM", "phi", layout=Separate(o="dense"), partial_rotary=True, refuse=_phi),
    _plain("stablelm", "StableLmForCausalLM", "stablelm", partial_rotary=True, refuse=_stablelm),
    _plain("nemotron", "NemotronForCausalLM", "nemotron", partial_rotary=True),
    _plain("phi3", "Phi3ForCausalLM", "phi3", layout=PHI3, partial_rotary=True),
    Family(
        "falcon",
        ("FalconForCausalLM",),
        ("falcon",),
        layout=FALCON,
        layers_path="transformer.h",
        attention="self_attention",
        kv_heads_key="num_kv_heads",
        embed_name="transformer.word_embeddings.weight",
        layer_kwargs={"alibi": None},
        refuse=_falcon,
        cache_heads=_falcon_cache_heads(),
    ),
)

MLA = (
    "uses multi-head latent attention (MLA): keys and values are decompressed per head from one shared latent "
    "that is already the whole KV cache, so there are no KV heads to merge"
)
MHA_ONLY = "its stock attention has no num_key_value_heads (MHA only), so a checkpoint with fewer KV heads cannot load"

REFUSED: dict[str, str] = {
    "DeepseekV2ForCausalLM": MLA,
    "DeepseekV3ForCausalLM": MLA,
    "DeepseekV32ForCausalLM": MLA,
    "MiniCPM3ForCausalLM": MLA,
    "KimiK25ForCausalLM": MLA,
    "GPTNeoXForCausalLM": f"GPT-NeoX: {MHA_ONLY} (its query_key_value is interleaved per head and fixed to MHA)",
    "PersimmonForCausalLM": f"Persimmon: {MHA_ONLY}",
}
