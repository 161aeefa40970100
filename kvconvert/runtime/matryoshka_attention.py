"""MatryoshkaKV attention: per-head orthogonal cuts of post-RoPE keys (and queries) and of values.

Registered with transformers' `AttentionInterface` (and `AttentionMaskInterface`, reusing the SDPA mask) as
"matryoshka". Each attention module carries a `HeadProjections` child (`module.matryoshka`) with its layer's bases
and rates. Two paths compute the same function:

- grouped (from `MatryoshkaCache`): the cache hands over `GroupedStates`, the projected keys/values of each group
  of KV heads that share a (key rate, value rate) pair; attention runs once per group at that group's width;
- masked (no cache, training, rate search): full-width projections with the dims past each head's rate zeroed.

Scores use the original `scaling` (1/sqrt(D)): with orthogonal P, q·k = (Pᵀq)·(Pᵀk), so at full rate both
paths reproduce the stock attention to round-off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

NAME = "matryoshka"


def cayley(skew_param: torch.Tensor) -> torch.Tensor:
    """Orthogonal (I − A)⁻¹(I + A) for A = S − Sᵀ (batched over leading dims); identity at S = 0."""
    a = skew_param - skew_param.transpose(-1, -2)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
    return torch.linalg.solve(eye - a, eye + a)


@dataclass
class Group:
    """KV heads `heads` that keep `key_rate` key dims and `value_rate` value dims, with their sliced bases."""

    heads: torch.Tensor  # (n_g,) long
    key_rate: int
    value_rate: int
    key_basis: torch.Tensor  # (n_g, D, key_rate)
    value_basis: torch.Tensor  # (n_g, D, value_rate)


@dataclass
class GroupedStates:
    """What `MatryoshkaLayer.update` returns in place of keys (values: None): per group, cached (B, n_g, T, r)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]


class HeadProjections(nn.Module):
    """One layer's bases (n_kv, D, D) and rates; optionally trainable as base @ cayley(skew)."""

    def __init__(self, key_basis: torch.Tensor, value_basis: torch.Tensor, key_rates, value_rates):
        super().__init__()
        self.register_buffer("key_base", key_basis.float().clone(), persistent=False)
        self.register_buffer("value_base", value_basis.float().clone(), persistent=False)
        self.key_skew: nn.Parameter | None = None
        self.value_skew: nn.Parameter | None = None
        self.enabled = True
        self.soft_masks: tuple[torch.Tensor, torch.Tensor] | None = None  # (n_kv, D) float: the search's gradients
        self._groups: list[Group] | None = None
        self.set_rates(key_rates, value_rates)

    def make_trainable(self) -> list[nn.Parameter]:
        """Start a Cayley parametrisation at the current bases; return its parameters."""
        self.key_skew = nn.Parameter(torch.zeros_like(self.key_base))
        self.value_skew = nn.Parameter(torch.zeros_like(self.value_base))
        return [self.key_skew, self.value_skew]

    def bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.key_skew is None:
            return self.key_base, self.value_base
        return self.key_base @ cayley(self.key_skew), self.value_base @ cayley(self.value_skew)

    def set_rates(self, key_rates, value_rates) -> None:
        self.key_rates = [int(r) for r in key_rates]
        self.value_rates = [int(r) for r in value_rates]
        self._groups = None

    def groups(self, dtype: torch.dtype) -> list[Group]:
        """Heads grouped by (key rate, value rate); cached while the bases are fixed (and stay on their device: a
        model moved to another device after a forward pass must not read the groups cut on the old one)."""
        cached = self._groups
        fixed = cached is not None and self.key_skew is None
        if fixed and (cached[0].key_basis.dtype, cached[0].key_basis.device) == (dtype, self.key_base.device):
            return cached
        pk, pv = (b.to(dtype) for b in self.bases())
        by_rate: dict[tuple[int, int], list[int]] = {}
        for h, pair in enumerate(zip(self.key_rates, self.value_rates, strict=True)):
            by_rate.setdefault(pair, []).append(h)
        out = []
        for (rk, rv), heads in sorted(by_rate.items()):
            idx = torch.tensor(heads, dtype=torch.long, device=pk.device)
            out.append(Group(idx, rk, rv, pk[idx, :, :rk].contiguous(), pv[idx, :, :rv].contiguous()))
        self._groups = out
        return out

    def masks(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.soft_masks is not None:
            return self.soft_masks
        dims = torch.arange(self.key_base.shape[-1], device=device)
        k = dims < torch.tensor(self.key_rates, device=device)[:, None]
        v = dims < torch.tensor(self.value_rates, device=device)[:, None]
        return k, v


def project_keys_values(key: torch.Tensor, value: torch.Tensor, group: Group) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n_kv, T, D) keys and values -> this group's projected (B, n_g, T, r_k) and (B, n_g, T, r_v)."""
    k = key.index_select(1, group.heads) if len(group.heads) != key.shape[1] else key
    v = value.index_select(1, group.heads) if len(group.heads) != value.shape[1] else value
    return torch.einsum("bhtd,hdr->bhtr", k, group.key_basis), torch.einsum("bhtd,hdr->bhtr", v, group.value_basis)


def _sdpa(q, k, v, attention_mask, scaling, is_causal) -> torch.Tensor:
    """F.scaled_dot_product_attention with KV heads shared by query groups (q: (B, H, Tq, E), k/v: (B, h, T, ·))."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=scaling, is_causal=is_causal)


def _causal(attention_mask, q_len: int, is_causal) -> bool:
    if is_causal is None:
        is_causal = True
    return bool(is_causal and attention_mask is None and q_len > 1)


def matryoshka_attention(
    module: nn.Module,
    query: torch.Tensor,
    key,
    value,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The registered attention function: returns (B, Tq, H, D) like transformers' SDPA attention."""
    proj: HeadProjections | None = getattr(module, "matryoshka", None)
    causal = _causal(
        attention_mask, query.shape[2], getattr(module, "is_causal", True) if is_causal is None else is_causal
    )
    if proj is None or not proj.enabled:
        out = _sdpa(query, key, value, attention_mask, scaling, causal)
    elif isinstance(key, GroupedStates):
        out = _grouped(proj, query, key, attention_mask, scaling, causal)
    else:
        out = _masked(proj, query, key, value, attention_mask, scaling, causal)
    return out.transpose(1, 2).contiguous(), None


def _grouped(proj, query, states: GroupedStates, attention_mask, scaling, causal) -> torch.Tensor:
    groups = proj.groups(query.dtype)
    b, h, tq, d = query.shape
    n_kv = len(proj.key_rates)
    rep = h // n_kv
    q = query.view(b, n_kv, rep, tq, d)
    if len(groups) == 1:
        g = groups[0]
        qg = torch.einsum("bhgtd,hdr->bhgtr", q, g.key_basis).reshape(b, h, tq, g.key_rate)
        o = _sdpa(qg, states.keys[0], states.values[0], attention_mask, scaling, causal)
        o = o.view(b, n_kv, rep, tq, g.value_rate)
        return torch.einsum("bhgtr,hdr->bhgtd", o, g.value_basis).reshape(b, h, tq, d)
    out = query.new_empty(b, n_kv, rep, tq, d)
    for g, keys, values in zip(groups, states.keys, states.values, strict=True):
        n_g = len(g.heads)
        qg = torch.einsum("bhgtd,hdr->bhgtr", q.index_select(1, g.heads), g.key_basis).reshape(b, n_g * rep, tq, -1)
        o = _sdpa(qg, keys, values, attention_mask, scaling, causal).view(b, n_g, rep, tq, g.value_rate)
        out.index_copy_(1, g.heads, torch.einsum("bhgtr,hdr->bhgtd", o, g.value_basis))
    return out.reshape(b, h, tq, d)


def _masked(proj, query, key, value, attention_mask, scaling, causal) -> torch.Tensor:
    pk, pv = (p.to(query.dtype) for p in proj.bases())
    mk, mv = proj.masks(query.device)
    b, h, tq, d = query.shape
    n_kv = key.shape[1]
    rep = h // n_kv
    k = torch.einsum("bhtd,hdr->bhtr", key, pk) * mk[None, :, None, :]
    v = torch.einsum("bhtd,hdr->bhtr", value, pv) * mv[None, :, None, :]
    q = torch.einsum("bhgtd,hdr->bhgtr", query.view(b, n_kv, rep, tq, d), pk) * mk[None, :, None, None, :]
    o = _sdpa(q.reshape(b, h, tq, d), k, v, attention_mask, scaling, causal).view(b, n_kv, rep, tq, d)
    return torch.einsum("bhgtr,hdr->bhgtd", o, pv).reshape(b, h, tq, d)


def register() -> None:
    """Register "matryoshka" with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, matryoshka_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def attention_modules(model) -> list[nn.Module]:
    """The model's attention modules in layer order (modules with `layer_idx` and a `k_proj`)."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "k_proj")]
    return sorted(mods, key=lambda m: m.layer_idx)
