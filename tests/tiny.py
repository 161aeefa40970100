"""Tiny random checkpoints of every supported family, with a tokenizer trained on synthetic text, on disk."""

from __future__ import annotations

import random
from pathlib import Path

import torch

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
