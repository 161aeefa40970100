"""KV-cache accounting: bytes from the config, checked against the DynamicCache stock transformers builds."""

from __future__ import annotations

import torch


def _kv_heads_and_head_dim(config) -> tuple[int, int]:
    """Heads per layer the cache holds and head size, as the model's family reads them, else the usual keys.

    Before transformers 5.25 Falcon's attention cached its keys and values already broadcast to every query head,
    so its DynamicCache held num_attention_heads heads per layer whatever num_kv_heads was (`Family.cache_heads`).
    """
    from kvconvert.errors import KVConvertError
    from kvconvert.families import family_for

    try:
        fam = family_for(config)
        geom = fam.geometry(config)
        return (geom.num_heads if fam.cache_heads == "query" else geom.num_kv_heads), geom.head_dim
    except KVConvertError:
        pass
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return n_kv, head_dim


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    """K and V cache bytes per token over all layers, for `dtype_bytes` per element."""
    n_kv, head_dim = _kv_heads_and_head_dim(config)
    return 2 * config.num_hidden_layers * n_kv * head_dim * dtype_bytes


def sliding_windows(config) -> list[int | None]:
    """Per layer, its attention window (None: full attention), as transformers' own DynamicCache lays it out."""
    from transformers import DynamicCache

    layers = DynamicCache(config=config).layers
    return [layer.sliding_window if getattr(layer, "is_sliding", False) else None for layer in layers]


def layer_windows(config) -> list[int | None]:
    """Per layer, the most tokens its cache keeps (None: all): sliding-window layers keep their last
    `sliding_window - 1` tokens (transformers' DynamicSlidingWindowLayer)."""
    return [None if w is None else w - 1 for w in sliding_windows(config)]


def kv_cache_bytes(config, dtype_bytes: int, tokens: int, batch: int = 1) -> int:
    """Computed size of the KV cache after `tokens` tokens of `batch` sequences (sliding windows included)."""
    n_kv, head_dim = _kv_heads_and_head_dim(config)
    kept = sum(tokens if w is None else min(tokens, w) for w in layer_windows(config))
    return 2 * kept * n_kv * head_dim * dtype_bytes * batch


def cache_bytes(cache) -> int:
    """Measured size of a transformers Cache: the bytes of every layer's key and value tensors."""
    size = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t is not None and t.numel():
                size += t.numel() * t.element_size()
    return size


@torch.no_grad()
def measured_cache_bytes(model, tokens: int = 32) -> int:
    """Size of the DynamicCache that one stock forward pass over `tokens` random tokens leaves behind."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    return cache_bytes(model(input_ids=ids.to(device), use_cache=True).past_key_values)


def kv_report(model, contexts: list[int], tokens: int = 32) -> dict:
    """Computed KV bytes per token and at each context (model dtype), and the cache measured after a forward."""
    dtype_bytes = next(model.parameters()).element_size()
    computed = kv_cache_bytes(model.config, dtype_bytes, tokens)
    measured = measured_cache_bytes(model, tokens)
    return {
        "dtype_bytes": dtype_bytes,
        "bytes_per_token": kv_bytes_per_token(model.config, dtype_bytes),
        "sliding_window_layers": sum(w is not None for w in layer_windows(model.config)),
        "measured_tokens": tokens,
        "measured_bytes": measured,
        "measured_bytes_per_token": measured / tokens,
        "computed_bytes": computed,
        "measured_matches": measured == computed,
        "bytes_at_context": {str(c): kv_cache_bytes(model.config, dtype_bytes, c) for c in contexts},
    }
