"""A float64 reference attention (GQA + RoPE with rotate_half), independent of transformers."""

from __future__ import annotations

import torch

from kvconvert.families import AttentionGeometry
from kvconvert.merge.moments import AttentionWeights
from kvconvert.merge.rope import rotate


def attention(w: AttentionWeights, x: torch.Tensor, geom: AttentionGeometry, theta: float = 10000.0) -> torch.Tensor:
    """Causal attention output (T, hidden) of x (T, hidden)."""
    t_len, d = x.shape[0], geom.head_dim
    f64 = torch.float64
    x = x.to(f64)

    def proj(weight: torch.Tensor, bias: torch.Tensor | None, heads: int) -> torch.Tensor:
        y = x @ weight.to(f64).T + (0 if bias is None else bias.to(f64))
        return y.reshape(t_len, heads, d).transpose(0, 1)

    q = proj(w.q_weight, w.q_bias, geom.num_heads)
    k = proj(w.k_weight, w.k_bias, geom.num_kv_heads)
    v = proj(w.v_weight, w.v_bias, geom.num_kv_heads)
    half = geom.rotary_dim // 2
    freq = theta ** (-torch.arange(half, dtype=f64) * 2 / geom.rotary_dim)
    pos = torch.arange(t_len, dtype=f64)
    q = torch.stack([rotate(q[:, t], pos[t] * freq, geom.rotary_dim) for t in range(t_len)], dim=1)
    k = torch.stack([rotate(k[:, t], pos[t] * freq, geom.rotary_dim) for t in range(t_len)], dim=1)
    k = k.repeat_interleave(geom.n_rep, dim=0)
    v = v.repeat_interleave(geom.n_rep, dim=0)
    scores = q @ k.transpose(1, 2) / d**0.5
    mask = torch.triu(torch.ones(t_len, t_len, dtype=torch.bool), 1)
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    out = (probs @ v).transpose(0, 1).reshape(t_len, -1)
    return out @ w.o_weight.to(f64).T
