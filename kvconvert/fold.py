"""Fold a layer plan into q/k/v/o weights and biases. Pure tensor code; output keeps the input dtype."""

from __future__ import annotations

import torch

from kvconvert.families import AttentionGeometry
from kvconvert.merge.moments import AttentionWeights
from kvconvert.plan import LayerPlan

F64 = torch.float64


def fold_layer(w: AttentionWeights, plan: LayerPlan, geom: AttentionGeometry) -> AttentionWeights:
    """New projections: k/v rows from the encoders, q rows and o columns permuted and mapped by the decoders.

    Query i reading old head s gets q_i' = D_sᵀ q_i (so q_i'ᵀ k_new = q_iᵀ D_s k_new ≈ q_iᵀ k_s; D_s commutes
    with RoPE), and its o_proj block becomes O_i V_s where V_s is the value decoder of s.

    Each head is computed in float64 and written straight into an output tensor of the input dtype, so memory
    stays about one layer in that dtype (no float64 copy of the whole layer).
    """
    d, n_rep, hidden = geom.head_dim, geom.n_rep, w.q_weight.shape[1]
    n_new = len(plan.heads)
    q = w.q_weight.reshape(geom.num_heads, d, hidden)
    k = w.k_weight.reshape(geom.num_kv_heads, d, hidden)
    v = w.v_weight.reshape(geom.num_kv_heads, d, hidden)
    o = w.o_weight.reshape(w.o_weight.shape[0], geom.num_heads, d)
    qb = None if w.q_bias is None else w.q_bias.reshape(geom.num_heads, d)
    kb = None if w.k_bias is None else w.k_bias.reshape(geom.num_kv_heads, d)
    vb = None if w.v_bias is None else w.v_bias.reshape(geom.num_kv_heads, d)

    new_q, new_o = torch.empty_like(w.q_weight), torch.empty_like(w.o_weight)
    new_k = w.k_weight.new_empty(n_new * d, hidden)
    new_v = w.v_weight.new_empty(n_new * d, hidden)
    new_qb = None if w.q_bias is None else torch.empty_like(w.q_bias)
    new_kb = None if w.k_bias is None else w.k_bias.new_empty(n_new * d)
    new_vb = None if w.v_bias is None else w.v_bias.new_empty(n_new * d)

    def heads(t: torch.Tensor, src: list[int]) -> torch.Tensor:
        return t[src].to(F64).reshape(len(src) * d, *t.shape[2:])

    row = 0  # query heads are written in plan order: each new KV head's readers are contiguous
    for j, h in enumerate(plan.heads):
        src, m, new = list(h.kv_heads), h.merge, slice(j * d, (j + 1) * d)
        new_k[new] = m.key_encoder @ heads(k, src)
        new_v[new] = m.value_encoder @ heads(v, src)
        if kb is not None:
            new_kb[new] = m.key_encoder @ heads(kb, src)
        if vb is not None:
            new_vb[new] = m.value_encoder @ heads(vb, src)
        for i in h.query_heads:
            s = src.index(i // n_rep)
            kd = m.key_decoder[s * d : (s + 1) * d]
            if geom.qk_norm is not None:  # the gain goes into the key norm (fold_norms), not through the query norm
                kd = kd / decoder_gain(m.key_decoder)
            vd = m.value_decoder[s * d : (s + 1) * d]
            out = slice(row * d, (row + 1) * d)
            new_q[out] = kd.T @ q[i].to(F64)
            if qb is not None:
                new_qb[out] = kd.T @ qb[i].to(F64)
            new_o[:, out] = o[:, i].to(F64) @ vd
            row += 1
    if row != geom.num_heads:
        raise ValueError(f"layer plan covers {row} of {geom.num_heads} query heads")

    q_norm, k_norm = fold_norms(w, plan, geom)
    return AttentionWeights(
        q_weight=new_q,
        k_weight=new_k,
        v_weight=new_v,
        o_weight=new_o,
        q_bias=new_qb,
        k_bias=new_kb,
        v_bias=new_vb,
        o_bias=w.o_bias,
        q_norm=q_norm,
        k_norm=k_norm,
    )


def fold_norms(
    w: AttentionWeights, plan: LayerPlan, geom: AttentionGeometry
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """QK-norm weights of the merged layer.

    Query-norm rows follow their query heads into plan order. Each new key head keeps the key-norm weight of its
    first source, times the RMS gain of its key decoder: the decoder maps the new head's *normalised* key back to
    each source's normalised key, and a norm cannot carry a gain through its input, so the gain goes into the
    weight (one shared weight: the mean gain). Identity decoders (exact duplicates, expansion) change nothing.
    """
    norm = geom.qk_norm
    if norm is None or w.k_norm is None:
        return w.q_norm, w.k_norm
    d = geom.head_dim
    order = plan.query_order
    q_norm = w.q_norm
    if norm.scope != "head":
        q_norm = norm.from_heads(norm.per_head(w.q_norm, geom.num_heads, d)[order], w.q_norm)
    old = norm.per_head(w.k_norm, geom.num_kv_heads, d)
    gains = [decoder_gain(h.merge.key_decoder) for h in plan.heads]
    if norm.scope == "head":  # one weight for all heads: their mean gain
        return q_norm, norm.from_heads(old[:1] * (sum(gains) / len(gains)), w.k_norm)
    if norm.scope == "all":  # one RMS over all heads: the gain of the whole projection
        gains = [(sum(g * g for g in gains) / len(gains)) ** 0.5] * len(gains)
    rows = torch.stack([old[h.kv_heads[0]] * g for h, g in zip(plan.heads, gains, strict=True)])
    return q_norm, norm.from_heads(rows, w.k_norm)


def decoder_gain(decoder: torch.Tensor) -> float:
    """RMS gain of a key decoder (S*d, d): sqrt(||D||² / (S*d)); 1 for identity blocks."""
    return float(decoder.pow(2).sum() / decoder.shape[0]) ** 0.5
