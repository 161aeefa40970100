"""KV-cache accounting: bytes per token from the config, checked against a real DynamicCache."""

from __future__ import annotations

import torch


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    """K and V cache bytes per token over all layers, for `dtype_bytes` per element."""
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * n_kv * head_dim * dtype_bytes


@torch.no_grad()
def measured_bytes_per_token(model, tokens: int = 32) -> float:
    """Size of the DynamicCache that stock transformers builds for `tokens` tokens, divided by `tokens`."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    cache = model(input_ids=ids.to(device), use_cache=True).past_key_values
    size = 0
    for layer in cache.layers:
        size += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return size / tokens


def kv_report(model, contexts: list[int]) -> dict:
    """Computed and measured KV bytes per token (in the model's dtype), and the computed size at each context."""
    dtype_bytes = next(model.parameters()).element_size()
    computed = kv_bytes_per_token(model.config, dtype_bytes)
    measured = measured_bytes_per_token(model)
    return {
        "dtype_bytes": dtype_bytes,
        "bytes_per_token": computed,
        "measured_bytes_per_token": measured,
        "measured_matches": measured == computed,
        "bytes_at_context": {str(c): computed * c for c in contexts},
    }
