"""MatryoshkaKV projections: one orthogonal basis per (layer, KV head) for keys and values, plus kept-dim rates.

Columns of a basis are ordered by importance, so any leading slice `basis[..., :r]` is a valid cut. Keys live
after RoPE (the cache stores rotated keys); values carry no RoPE. Everything here is pure math and file IO.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from kvconvert.errors import KVConvertError

FILENAME = "matryoshka.safetensors"
FORMAT = "kvconvert-matryoshka/1"


@dataclass(frozen=True)
class Projections:
    """Bases (L, n_kv, D, D) float32 with orthonormal columns, and rates (L, n_kv) int64 (kept leading columns)."""

    key_basis: torch.Tensor
    value_basis: torch.Tensor
    key_rates: torch.Tensor
    value_rates: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        layers, n_kv, head_dim, _ = self.key_basis.shape
        return layers, n_kv, head_dim

    def fraction(self) -> float:
        """Kept share of the original cache: Σ(r_k + r_v) / (2·L·n_kv·D)."""
        layers, n_kv, head_dim = self.shape
        return float(self.key_rates.sum() + self.value_rates.sum()) / (2 * layers * n_kv * head_dim)

    def kept_per_token(self) -> int:
        """Cached elements per token and sequence over all layers and heads."""
        return int(self.key_rates.sum() + self.value_rates.sum())

    def with_rates(self, key_rates: torch.Tensor, value_rates: torch.Tensor) -> Projections:
        return replace(self, key_rates=key_rates.long().clone(), value_rates=value_rates.long().clone())

    def with_bases(self, key_basis: torch.Tensor, value_basis: torch.Tensor) -> Projections:
        return replace(self, key_basis=key_basis.float().contiguous(), value_basis=value_basis.float().contiguous())


def full_rates(layers: int, n_kv: int, head_dim: int) -> torch.Tensor:
    return torch.full((layers, n_kv), head_dim, dtype=torch.long)


def uniform_rate(head_dim: int, fraction: float, step: int) -> int:
    """The kept dims per head at a uniform `fraction`: the largest multiple of `step` within it (at least one step)."""
    return int(min(head_dim, max(step, math.floor(fraction * head_dim / step + 1e-9) * step)))


def pca_bases(moments: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of second moments (..., D, D), columns by descending eigenvalue (float32)."""
    sym = (moments.double() + moments.double().transpose(-1, -2)) / 2
    _, vecs = torch.linalg.eigh(sym)
    return vecs.flip(-1).float().contiguous()


def orthogonality_error(basis: torch.Tensor) -> float:
    """max ‖PᵀP − I‖_max over all heads."""
    eye = torch.eye(basis.shape[-1], dtype=torch.float64)
    return float((basis.double().transpose(-1, -2) @ basis.double() - eye).abs().max())


def save_projections(path: Path, proj: Projections, info: dict) -> None:
    """Write bases and rates to a safetensors file; `info` (JSON) goes into its metadata."""
    from safetensors.torch import save_file

    tensors = {
        "key_basis": proj.key_basis.float().contiguous(),
        "value_basis": proj.value_basis.float().contiguous(),
        "key_rates": proj.key_rates.to(torch.int32).contiguous(),
        "value_rates": proj.value_rates.to(torch.int32).contiguous(),
    }
    save_file(tensors, str(path), metadata={"format": FORMAT, "info": json.dumps(info)})


def load_projections(path: Path) -> tuple[Projections, dict]:
    """(Projections, info) from a file written by `save_projections` (a directory means its matryoshka.safetensors)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise KVConvertError(f"{path} does not exist; run `kvconvert matryoshka` to create it")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise KVConvertError(f"{path} is not a MatryoshkaKV projection file (format {meta.get('format')})")
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open is no dict)
    proj = Projections(t["key_basis"], t["value_basis"], t["key_rates"].long(), t["value_rates"].long())
    return proj, json.loads(meta.get("info", "{}"))
