"""Tiny random checkpoints of every supported family, with a tokenizer trained on synthetic text, on disk."""

from __future__ import annotations

import random
from pathlib import Path

import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
"""Devices the device-parametrised tests run on: the CPU, and the GPU where there is one (bench/gpu.sh)."""

WORDS = [
    "cache",
    "head",
    "query",
    "key",
    "value",
    "merge",
    "layer",
    "token",
    "model",
    "group",
    "rotate",
    "frequency",
    "pair",
    "matrix",
    "vector",
    "sum",
    "mean",
    "energy",
    "weight",
    "bias",
    "output",
    "input",
    "small",
    "large",
    "fast",
    "slow",
    "first",
    "last",
    "next",
    "every",
    "some",
    "none",
    "all",
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "on",
    "with",
    "for",
    "by",
    "from",
]


def synthetic_text(n_docs: int = 200, seed: int = 0) -> list[str]:
    """Documents of random sentences over a fixed word list (our own text, nothing copied)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = [" ".join(rng.choices(WORDS, k=rng.randint(4, 12))).capitalize() + "." for _ in range(6)]
        docs.append(" ".join(sentences))
    return docs


def make_tokenizer(directory: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(synthetic_text(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    fast.save_pretrained(directory)
    return fast


FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}

SLIDING = {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8}
TINY_FAMILIES: dict[str, tuple[str, dict]] = {
    # registry family -> (config class, extra config) for tiny random models; every registered family needs one
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 8}),
    "qwen2": ("Qwen2Config", {}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 2, "num_experts_per_tok": 1}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {
            "num_experts": 2,
            "num_experts_per_tok": 1,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 16,
        },
    ),
    "qwen3": ("Qwen3Config", {}),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 16}),
    "granite": (
        "GraniteConfig",
        {"embedding_multiplier": 2.0, "attention_multiplier": 0.3, "residual_multiplier": 0.5},
    ),
    "granitemoe": ("GraniteMoeConfig", {"num_local_experts": 2, "num_experts_per_tok": 1, "embedding_multiplier": 2.0}),
    "starcoder2": ("Starcoder2Config", {"use_bias": True}),
    "olmo": ("OlmoConfig", {"clip_qkv": 8.0}),
    "olmo2": ("Olmo2Config", {}),
    "olmo3": ("Olmo3Config", SLIDING),
    "gemma": ("GemmaConfig", {}),
    "gemma2": ("Gemma2Config", {**SLIDING, "attn_logit_softcapping": 5.0, "query_pre_attn_scalar": 24}),
    "gemma3": ("Gemma3TextConfig", {**SLIDING, "query_pre_attn_scalar": 24}),
    "helium": ("HeliumConfig", {}),
    "glm": ("GlmConfig", {"partial_rotary_factor": 0.5, "attention_bias": True}),
    "exaone4": ("Exaone4Config", SLIDING),
    "cohere": ("CohereConfig", {"use_qk_norm": True}),
    "cohere2": ("Cohere2Config", SLIDING),
    "phi": ("PhiConfig", {"partial_rotary_factor": 0.5}),
    "stablelm": ("StableLmConfig", {"partial_rotary_factor": 0.25, "use_qkv_bias": True}),
    "nemotron": ("NemotronConfig", {"partial_rotary_factor": 0.5}),
    "phi3": ("Phi3Config", {"partial_rotary_factor": 0.75}),
    "falcon": ("FalconConfig", {"new_decoder_architecture": True, "bias": True}),
}
MHA_ONLY: set[str] = set()


def tiny_config(
    family: str, *, heads: int = 4, kv_heads: int = 2, head_dim: int = 16, layers: int = 2, vocab: int = 64
):
    """A tiny config of registered `family` (random weights, no tokenizer needed)."""
    import transformers

    name, extra = TINY_FAMILIES[family]
    kw = {
        "vocab_size": vocab,
        "hidden_size": heads * head_dim,
        "intermediate_size": 2 * heads * head_dim,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 128,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
    }
    if family == "falcon":
        kw |= {"num_kv_heads": kv_heads, "ffn_hidden_size": 2 * heads * head_dim}
        del kw["intermediate_size"]
    else:
        kw |= {"num_key_value_heads": kv_heads, "head_dim": head_dim}
    return getattr(transformers, name)(**(kw | extra))


def make_random(directory: Path, family: str, *, seed: int = 0, **shape) -> Path:
    """Save a tiny random model of `family` whose norms and biases are random too (so they matter)."""
    from transformers import AutoModelForCausalLM

    from kvconvert.families import family_for

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **shape))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif p.dim() == 2 and (".self_attn." in name or ".self_attention." in name):
                p.normal_(0, p.shape[1] ** -0.5)  # unit-scale projections: attention that is far from uniform
            elif "norm" in name or "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.3)
            if name.endswith("k_norm.weight"):  # one dim the norm zeroes (Gemma 3 has such dims): it still counts
                p.view(-1)[1] = -family_for(model.config).qk_norm.offset
    model.save_pretrained(directory)
    return directory


def make_model(
    directory: Path,
    family: str = "llama",
    *,
    heads: int = 8,
    kv_heads: int = 4,
    head_dim: int = 16,
    layers: int = 2,
    tied: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Save a random model of `family` (and a tokenizer) to `directory`; return it."""
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(directory)
    config_cls, model_cls = (getattr(transformers, n) for n in FAMILY_CONFIGS[family])
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=heads * head_dim,
        intermediate_size=2 * heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype)
    with torch.no_grad():  # random biases where the family has them, so they matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(directory)
    return directory


def write_text(path: Path, n_docs: int = 200, seed: int = 0) -> Path:
    path.write_text("\n\n".join(synthetic_text(n_docs, seed)))
    return path
