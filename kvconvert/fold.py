"""Fold a layer plan into q/k/v/o weights and biases. Pure tensor code; output keeps the input dtype."""

from __future__ import annotations

import torch

from kvconvert.families import AttentionGeometry
from kvconvert.merge.moments import AttentionWeights
from kvconvert.plan import LayerPlan


def fold_layer(w: AttentionWeights, plan: LayerPlan, geom: AttentionGeometry) -> AttentionWeights:
    """New projections: k/v rows from the encoders, q rows and o columns permuted and mapped by the decoders.

    Query i reading old head s gets q_i' = D_sᵀ q_i (so q_i'ᵀ k_new = q_iᵀ D_s k_new ≈ q_iᵀ k_s; D_s commutes
    with RoPE), and its o_proj block becomes O_i V_s where V_s is the value decoder of s.
    """
    d, n_rep, hidden = geom.head_dim, geom.n_rep, w.q_weight.shape[1]
    f64 = torch.float64
    q = w.q_weight.to(f64).reshape(geom.num_heads, d, hidden)
    k = w.k_weight.to(f64).reshape(geom.num_kv_heads, d, hidden)
    v = w.v_weight.to(f64).reshape(geom.num_kv_heads, d, hidden)
    o = w.o_weight.to(f64).reshape(w.o_weight.shape[0], geom.num_heads, d)
    qb = None if w.q_bias is None else w.q_bias.to(f64).reshape(geom.num_heads, d)
    kb = None if w.k_bias is None else w.k_bias.to(f64).reshape(geom.num_kv_heads, d)
    vb = None if w.v_bias is None else w.v_bias.to(f64).reshape(geom.num_kv_heads, d)

    new_q, new_qb, new_k, new_kb, new_v, new_vb, new_o = [], [], [], [], [], [], []
    for h in plan.heads:
        src = list(h.kv_heads)
        m = h.merge
        new_k.append(m.key_encoder @ k[src].reshape(-1, hidden))
        new_v.append(m.value_encoder @ v[src].reshape(-1, hidden))
        if kb is not None:
            new_kb.append(m.key_encoder @ kb[src].reshape(-1))
        if vb is not None:
            new_vb.append(m.value_encoder @ vb[src].reshape(-1))
        for i in h.query_heads:
            s = src.index(i // n_rep)
            kd = m.key_decoder[s * d : (s + 1) * d]
            vd = m.value_decoder[s * d : (s + 1) * d]
            new_q.append(kd.T @ q[i])
            if qb is not None:
                new_qb.append(kd.T @ qb[i])
            new_o.append(o[:, i] @ vd)

    def out(parts: list[torch.Tensor], like: torch.Tensor | None, dim: int = 0) -> torch.Tensor | None:
        if like is None:
            return None
        return torch.cat(parts, dim=dim).to(like.dtype)

    return AttentionWeights(
        q_weight=out(new_q, w.q_weight),
        k_weight=out(new_k, w.k_weight),
        v_weight=out(new_v, w.v_weight),
        o_weight=out(new_o, w.o_weight, dim=1),
        q_bias=out(new_qb, w.q_bias),
        k_bias=out(new_kb, w.k_bias),
        v_bias=out(new_vb, w.v_bias),
    )
