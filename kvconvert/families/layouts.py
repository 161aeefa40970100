"""How a family stores its q/k/v/o projections, read into and written back from one `AttentionWeights` layout.

Names are relative to the attention module (`q_proj.weight`), so the same code serves checkpoint tensors (with
the layer prefix added by the family) and a live module's state dict (refinement).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvconvert.types import AttentionWeights as Weights

__all__ = ["FALCON", "PHI3", "SEPARATE", "FalconGrouped", "FusedQKV", "Layout", "Separate", "Weights"]


@dataclass(frozen=True)
class Layout:
    """Base: subclasses name their modules and split/join the projections."""

    o: str = "o_proj"

    def modules(self) -> tuple[str, ...]:
        raise NotImplementedError

    def module_of(self, proj: str) -> str:
        raise KeyError(f"{type(self).__name__} stores no separate {proj} projection")

    def weight_names(self) -> list[str]:
        return [f"{m}.weight" for m in self.modules()]

    def bias_names(self) -> list[str]:
        return [f"{m}.bias" for m in self.modules()]

    def read(self, t: dict[str, torch.Tensor], geom) -> Weights:
        raise NotImplementedError

    def write(self, w: Weights, geom) -> dict[str, torch.Tensor]:
        raise NotImplementedError


@dataclass(frozen=True)
class Separate(Layout):
    """q, k, v and o in their own linear modules (Llama and most families)."""

    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"

    def modules(self) -> tuple[str, ...]:
        return (self.q, self.k, self.v, self.o)

    def module_of(self, proj: str) -> str:
        return dict(zip("qkvo", self.modules(), strict=True))[proj]

    def read(self, t: dict[str, torch.Tensor], geom) -> Weights:
        q, k, v, o = self.modules()
        return Weights(
            t[f"{q}.weight"],
            t[f"{k}.weight"],
            t[f"{v}.weight"],
            t[f"{o}.weight"],
            *(t.get(f"{m}.bias") for m in (q, k, v, o)),
        )

    def write(self, w: Weights, geom) -> dict[str, torch.Tensor]:
        out = {}
        for m, weight, bias in zip(
            self.modules(),
            (w.q_weight, w.k_weight, w.v_weight, w.o_weight),
            (w.q_bias, w.k_bias, w.v_bias, w.o_bias),
            strict=True,
        ):
            out[f"{m}.weight"] = weight
            if bias is not None:
                out[f"{m}.bias"] = bias
        return out


@dataclass(frozen=True)
class FusedQKV(Layout):
    """One `qkv` module whose rows are [all q heads; all k heads; all v heads] (Phi-3, Phi-4)."""

    qkv: str = "qkv_proj"

    def modules(self) -> tuple[str, ...]:
        return (self.qkv, self.o)

    def read(self, t: dict[str, torch.Tensor], geom) -> Weights:
        nq, nk = geom.num_heads * geom.head_dim, geom.num_kv_heads * geom.head_dim
        sizes = [nq, nk, t[f"{self.qkv}.weight"].shape[0] - nq - nk]
        q, k, v = torch.split(t[f"{self.qkv}.weight"], sizes)
        b = t.get(f"{self.qkv}.bias")
        qb, kb, vb = (None, None, None) if b is None else torch.split(b, sizes)
        return Weights(q, k, v, t[f"{self.o}.weight"], qb, kb, vb, t.get(f"{self.o}.bias"))

    def write(self, w: Weights, geom) -> dict[str, torch.Tensor]:
        out = {f"{self.qkv}.weight": torch.cat([w.q_weight, w.k_weight, w.v_weight]), f"{self.o}.weight": w.o_weight}
        if w.q_bias is not None:
            out[f"{self.qkv}.bias"] = torch.cat([w.q_bias, w.k_bias, w.v_bias])
        if w.o_bias is not None:
            out[f"{self.o}.bias"] = w.o_bias
        return out


@dataclass(frozen=True)
class FalconGrouped(Layout):
    """One `query_key_value` module grouped per KV head: [n_rep q heads, k, v] for each KV head (Falcon's new
    decoder architecture)."""

    qkv: str = "query_key_value"
    o: str = "dense"

    def modules(self) -> tuple[str, ...]:
        return (self.qkv, self.o)

    def _split(self, x: torch.Tensor, geom) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = x.reshape(geom.num_kv_heads, geom.n_rep + 2, geom.head_dim, *x.shape[1:])
        flat = (-1, *x.shape[1:])
        return g[:, :-2].reshape(flat), g[:, -2].reshape(flat), g[:, -1].reshape(flat)

    def _join(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geom) -> torch.Tensor:
        n, d, rest = geom.num_kv_heads, geom.head_dim, q.shape[1:]
        g = torch.cat([q.reshape(n, geom.n_rep, d, *rest), k.reshape(n, 1, d, *rest), v.reshape(n, 1, d, *rest)], dim=1)
        return g.reshape(-1, *rest)

    def read(self, t: dict[str, torch.Tensor], geom) -> Weights:
        q, k, v = self._split(t[f"{self.qkv}.weight"], geom)
        b = t.get(f"{self.qkv}.bias")
        qb, kb, vb = (None, None, None) if b is None else self._split(b, geom)
        return Weights(q, k, v, t[f"{self.o}.weight"], qb, kb, vb, t.get(f"{self.o}.bias"))

    def write(self, w: Weights, geom) -> dict[str, torch.Tensor]:
        out = {
            f"{self.qkv}.weight": self._join(w.q_weight, w.k_weight, w.v_weight, geom),
            f"{self.o}.weight": w.o_weight,
        }
        if w.q_bias is not None:
            out[f"{self.qkv}.bias"] = self._join(w.q_bias, w.k_bias, w.v_bias, geom)
        if w.o_bias is not None:
            out[f"{self.o}.bias"] = w.o_bias
        return out


SEPARATE = Separate()
PHI3 = FusedQKV()
FALCON = FalconGrouped()
