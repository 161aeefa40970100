"""Checks on a source checkpoint before any long work: a problem found here costs seconds, not a failed run."""

from __future__ import annotations

from kvconvert.checkpoint import TOKENIZER_CORE, Checkpoint
from kvconvert.errors import KVConvertError


def check_source(ckpt: Checkpoint, *, require_tokenizer: bool = True) -> None:
    """Every shard readable, every attention tensor present, an output head unless tied, and a tokenizer.

    Opening the shards catches missing, truncated and corrupt files; NaN/Inf in attention weights is caught when
    each layer is read (`Checkpoint.attention`).
    """
    quantization = ckpt.raw_config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "quantized") if isinstance(quantization, dict) else "quantized"
        raise KVConvertError(
            f"{ckpt.spec} is a quantized checkpoint ({method}); kvconvert merges floating-point weights: convert "
            "the unquantized (bfloat16, float16 or float32) checkpoint, then quantize the output"
        )
    reader, fam = ckpt.tensors, ckpt.family
    geom = fam.geometry(ckpt.config)
    needed = [fam.embed_name] + [n for i in range(geom.num_layers) for n in fam.weight_names(i)]
    missing = [name for name in needed if name not in reader]
    if missing:
        raise KVConvertError(
            f"{ckpt.spec} lacks {missing[0]} ({len(missing)} tensors missing); point MODEL at a complete checkpoint"
        )
    tied = bool(getattr(ckpt.config, "tie_word_embeddings", False))
    if not tied and fam.lm_head_name not in reader:
        raise KVConvertError(
            f"{ckpt.spec} has no {fam.lm_head_name} and its config does not tie it to the embeddings; re-download the "
            "checkpoint (or set tie_word_embeddings: true in config.json if the model really ties them)"
        )
    if require_tokenizer and not ckpt.has_tokenizer():
        raise KVConvertError(
            f"{ckpt.spec} has no tokenizer ({', '.join(TOKENIZER_CORE)}); copy the base model's tokenizer files "
            "there, or pass --allow-missing-tokenizer to write a checkpoint without one"
        )
