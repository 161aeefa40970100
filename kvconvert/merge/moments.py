"""Second moments of projections, W E[x xᵀ] Wᵀ, from the attention input's float64 sums."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvconvert.families import AttentionGeometry
from kvconvert.merge import qknorm, rope
from kvconvert.types import AttentionWeights

__all__ = ["AttentionWeights", "LayerMoments", "layer_moments"]


@dataclass(frozen=True)
class LayerMoments:
    """All moments one layer's merges read, for every KV head and query head."""

    key_moment: torch.Tensor  # (n_kv*d, n_kv*d)
    key_mean: torch.Tensor  # (n_kv*d,)
    value_moment: torch.Tensor  # (n_kv*d, n_kv*d)
    query_pair_energy: torch.Tensor  # (n_heads, pairs)
    query_pass_moment: torch.Tensor  # (n_heads, p, p)
    out_gram: torch.Tensor  # (n_heads, d, d)
    key_rms: torch.Tensor | None = None  # QK-norm: (n_kv,) RMS r_s of each key head at calibration
    key_weight: torch.Tensor | None = None  # QK-norm: (n_kv, d) effective key-norm weights
    key_unit_moment: torch.Tensor | None = None  # QK-norm: (n_kv*d)² moment of u_s = P k_s / r_s


def _moment(wx: torch.Tensor, w: torch.Tensor, wm: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """E[y yᵀ] for y = W x + b given W·E[xxᵀ] (wx), W and W·E[x] (wm)."""
    c = wx @ w.T
    if b is not None:
        c = c + torch.outer(wm, b) + torch.outer(b, wm) + torch.outer(b, b)
    return (c + c.T) / 2


def layer_moments(
    weights: AttentionWeights,
    second: torch.Tensor,
    mean: torch.Tensor,
    geom: AttentionGeometry,
    work_dtype: torch.dtype = torch.float32,
) -> LayerMoments:
    """Moments of keys, values and queries for one layer, on `second`'s device, returned in float64.

    The large products W·E[xxᵀ]·Wᵀ run in `work_dtype`: float32 by default, finer than the bf16/fp32 weights
    themselves and twice as fast as float64 on CPU; the statistics are float64 sums and every eigen-solve after
    this is float64.
    """
    dev = second.device
    second, mean = second.to(work_dtype), mean.to(work_dtype)

    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(dev, work_dtype)

    q, k, v, o = (cast(t) for t in (weights.q_weight, weights.k_weight, weights.v_weight, weights.o_weight))
    qb, kb, vb = cast(weights.q_bias), cast(weights.k_bias), cast(weights.v_bias)
    d, nh = geom.head_dim, geom.num_heads

    km = k @ mean + (kb if kb is not None else 0)
    key_moment = _moment(k @ second, k, k @ mean, kb)
    value_moment = _moment(v @ second, v, v @ mean, vb)

    qx = q @ second
    qm = q @ mean
    re, im, ps = rope.pair_dims(d, geom.rotary_dim)
    key_rms = key_weight = key_unit = None
    if geom.qk_norm is not None and weights.k_norm is not None:  # moments of what attention reads: normed q, k
        norm = geom.qk_norm
        k_units, key_rms, key_weight = qknorm.norm_scales(
            qknorm.diagonal_blocks(key_moment, geom.num_kv_heads), weights.k_norm, norm
        )
        key_unit, _ = qknorm.normalise(key_moment, km, k_units)
        k_mats = key_weight.unsqueeze(-1) * k_units
        key_moment, km = qknorm.normalise(key_moment, km, k_mats)
        q_blocks = torch.stack(
            [
                _moment(qx[i * d : (i + 1) * d], q[i * d : (i + 1) * d], qm[i * d : (i + 1) * d], _rows(qb, i, d))
                for i in range(nh)
            ]
        )
        q_units, _, q_weight = qknorm.norm_scales(q_blocks, weights.q_norm, norm)
        q_mats = q_weight.unsqueeze(-1) * q_units
        q_blocks = q_mats @ q_blocks @ q_mats.transpose(-1, -2)
        diag = q_blocks.diagonal(dim1=-2, dim2=-1)
        pass_moment = q_blocks[:, ps[:, None], ps[None, :]]
    else:
        diag = (qx * q).sum(-1)
        if qb is not None:
            diag = diag + 2 * qb * qm + qb * qb
        diag = diag.reshape(nh, d)
        pass_moment = torch.zeros(nh, len(ps), len(ps), dtype=work_dtype, device=dev)
        for i in range(nh):
            if len(ps):
                rows = i * d + ps.to(dev)
                pass_moment[i] = _moment(qx[rows], q[rows], qm[rows], None if qb is None else qb[rows])
    pair_energy = diag[:, re] + diag[:, im]

    o_heads = o.reshape(o.shape[0], nh, d).permute(1, 0, 2)  # (nh, hidden, d)
    out_gram = o_heads.transpose(1, 2) @ o_heads
    f64 = torch.float64
    return LayerMoments(
        key_moment.to(f64),
        km.to(f64),
        value_moment.to(f64),
        pair_energy.to(f64),
        pass_moment.to(f64),
        out_gram.to(f64),
        None if key_rms is None else key_rms.to("cpu", f64),
        None if key_weight is None else key_weight.to("cpu", f64),
        None if key_unit is None else key_unit.to(f64),
    )


def _rows(t: torch.Tensor | None, head: int, d: int) -> torch.Tensor | None:
    return None if t is None else t[head * d : (head + 1) * d]
