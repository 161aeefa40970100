"""Post-RoPE key and value second moments per (layer, KV head), the statistics MatryoshkaKV's PCA starts from.

The existing calibration statistics hold moments of the attention *input* (pre-RoPE); a position-independent cut
of rotated keys needs E[k kᵀ] of the keys *after* RoPE, averaged over positions. This pass collects it directly:
a collecting attention function (registered with transformers' `AttentionInterface`) sees exactly the rotated keys
and the values the cache would store, adds k kᵀ and v vᵀ in float64, and then runs stock SDPA. The result is its
own small file (`kv_moments.safetensors`), so existing statistics files are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kvconvert.progress import Progress, Silent

COLLECT = "matryoshka_moments"


@dataclass(frozen=True)
class KVMoments:
    """Σ k kᵀ and Σ v vᵀ (L, n_kv, D, D) float64 over `tokens` token positions (summed, not yet divided)."""

    keys: torch.Tensor
    values: torch.Tensor
    tokens: int

    def mean(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys / self.tokens, self.values / self.tokens


@torch.no_grad()
def collect_kv_moments(
    model, windows: torch.Tensor, batch_size: int = 1, progress: Progress | None = None
) -> KVMoments:
    """One forward pass over `windows` (n, T) collecting post-RoPE key/value second moments per layer and head."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    sums: dict[int, list[torch.Tensor]] = {}

    def collecting(module, query, key, value, attention_mask, **kwargs):
        k, v = key.double(), value.double()
        acc = sums.setdefault(module.layer_idx, [0, 0])
        acc[0] = acc[0] + torch.einsum("bhtd,bhte->hde", k, k).cpu()
        acc[1] = acc[1] + torch.einsum("bhtd,bhte->hde", v, v).cpu()
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(COLLECT, collecting)
    AttentionMaskInterface.register(COLLECT, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(COLLECT)
    device = next(model.parameters()).device
    advance = (progress or Silent()).task("kv moments", len(windows))
    try:
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size].to(device)
            model(input_ids=batch, use_cache=False)
            advance(len(batch))
    finally:
        model.set_attn_implementation(previous)
    order = sorted(sums)
    return KVMoments(
        torch.stack([sums[i][0] for i in order]), torch.stack([sums[i][1] for i in order]), int(windows.numel())
    )


def save_moments(path: Path, moments: KVMoments) -> None:
    from safetensors.torch import save_file

    save_file(
        {"key_moments": moments.keys, "value_moments": moments.values},
        str(path),
        metadata={"tokens": str(moments.tokens), "format": "kvconvert-kv-moments/1"},
    )


def load_moments(path: Path) -> KVMoments:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        tokens = int((f.metadata() or {})["tokens"])
        return KVMoments(f.get_tensor("key_moments"), f.get_tensor("value_moments"), tokens)
