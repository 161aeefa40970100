"""The `razor` attention function (registered with transformers' `AttentionInterface`).

It reads the `RazorView` that `RazorLayer.update` attaches to the keys: query heads are gathered per head role,
attended with one SDPA call per role (retrieval heads over every token, each window group over its held tokens) and
scattered back. Without a `RazorCache` (e.g. `use_cache=False`) it is transformers' own SDPA attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "razor"


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask, scaling, group: int) -> torch.Tensor:
    """SDPA of (b, kv*group, q, d) queries on (b, kv, k, d) keys; decode folds the group into the query length."""
    b, hq, q, d = query.shape
    if mask is None and q == 1 and group > 1:
        out = F.scaled_dot_product_attention(query.reshape(b, hq // group, group, d), key, value, scale=scaling)
        return out.reshape(b, hq, 1, -1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=group > 1)


def razor_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """(b, q, heads, d_v) attention output and no weights."""
    view = getattr(key, "razor_view", None)
    if view is None:  # another cache, or none: transformers' SDPA (causal mask aligned to the last key)
        window = kwargs.get("sliding_window")
        q, k = query.shape[2], key.shape[2]
        # the model built no mask (`razor` asks for none): a sliding-window layer needs its window back
        if attention_mask is None and ((1 < q < k) or (window and k > window)):
            attention_mask = _bottom_right_causal(q, k, query.device, window)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if attention_mask is not None:
        raise ValueError("the razor cache serves unpadded batches only (all sequences of one length)")
    b, heads, q, _ = query.shape
    out = query.new_empty(b, heads, q, value.shape[-1])
    roles = [(view.full_q, view.full_k, view.full_v, view.full_mask), *view.windowed]
    for idx, k, v, mask in roles:  # one call per head role (retrieval, each window), not a loop over heads
        if idx.numel():
            group = idx.numel() // k.shape[1]
            out.index_copy_(1, idx, _attend(query.index_select(1, idx), k, v, mask, scaling, group))
    return out.transpose(1, 2).contiguous(), None


def _bottom_right_causal(q: int, k: int, device, window: int | None = None) -> torch.Tensor:
    """(q, k) causal mask of the last `q` of `k` positions; with `window`, each query sees its last `window` keys
    (transformers' sliding-window rule: key > query - window)."""
    key, query = torch.arange(k, device=device)[None, :], torch.arange(k - q, k, device=device)[:, None]
    mask = key <= query
    return mask & (key > query - window) if window else mask


def _mask_only_for_padding(attention_mask=None, **kwargs):
    """The mask the model builds for `razor`: none (the cache masks itself), or SDPA's mask if a batch is padded."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return sdpa_mask(attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Register the `razor` attention and mask functions (idempotent); returns the implementation name."""
    AttentionInterface.register(NAME, razor_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, _mask_only_for_padding)
    return NAME
