"""Fold a values-only MatryoshkaKV cut into a stock checkpoint's `v_proj` (exact; the cache stays full-width).

With keys at full rate the cut model computes attention over values `Pᵣ Pᵣᵀ v` per KV head, which is what a stock
model computes with `v_proj ← blockdiag(Pᵣ Pᵣᵀ) · v_proj` (and the bias likewise). Stock runtimes then reproduce the
cut model exactly; the memory saving itself needs the MatryoshkaKV runtime, since stock caches store full width.
"""

from __future__ import annotations

import torch

from kvconvert.errors import KVConvertError
from kvconvert.matryoshka.projections import Projections
from kvconvert.runtime.matryoshka_attention import attention_modules


@torch.no_grad()
def fold_value_cut(model, proj: Projections) -> None:
    """Replace every v_proj weight (and bias) in place by its cut: exact only for values-only projections."""
    _, n_kv, head_dim = proj.shape
    if (proj.key_rates != head_dim).any():
        raise KVConvertError("folding into a stock checkpoint is exact only for a values-only cut (--values-only)")
    dims = torch.arange(head_dim)
    for i, m in enumerate(attention_modules(model)):
        w = m.v_proj.weight
        keep = (dims < proj.value_rates[i][:, None]).double()  # (n_kv, D)
        basis = proj.value_basis[i].double()
        cut = torch.einsum("hdr,hr,her->hde", basis, keep, basis).to(w.device)  # Pᵣ Pᵣᵀ per head, where v_proj is
        folded = torch.einsum("hde,hex->hdx", cut, w.double().view(n_kv, head_dim, -1))
        w.copy_(folded.reshape_as(w).to(w.dtype))
        if m.v_proj.bias is not None:
            b = m.v_proj.bias
            b.copy_(torch.einsum("hde,he->hd", cut, b.double().view(n_kv, head_dim)).reshape_as(b).to(b.dtype))
