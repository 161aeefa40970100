"""Expand a GQA checkpoint to MHA (every query head gets its own copy of its KV head), optionally shuffled.

Expansion is exact, so it makes test and benchmark models whose ideal merge is known: merging the expanded model
back must find the copies and recover the original.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kvconvert.checkpoint import Checkpoint
from kvconvert.converted import Converted
from kvconvert.export import write_checkpoint
from kvconvert.merge.methods import HeadMerge
from kvconvert.plan import CompressionPlan, LayerPlan, NewHead


def expansion_plan(num_layers: int, num_heads: int, n_rep: int, head_dim: int, seed: int | None) -> CompressionPlan:
    """Identity maps, one new KV head per query head; `seed` shuffles the head order per layer."""
    eye = torch.eye(head_dim, dtype=torch.float64)
    ident = HeadMerge(0.0, 0.0, 0.0, 0.0, eye, eye, eye, eye)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    layers = []
    for _ in range(num_layers):
        order = torch.randperm(num_heads, generator=gen).tolist() if gen else list(range(num_heads))
        layers.append(LayerPlan(tuple(NewHead((i,), (i // n_rep,), ident) for i in order)))
    return CompressionPlan(
        "expand", "shuffled" if seed is not None else "identity", num_heads // n_rep, num_heads, tuple(layers)
    )


def expand_to_mha(ckpt: Checkpoint, output: Path, seed: int | None = None, overwrite: bool = False) -> Path:
    """Write the MHA-expanded (and, with `seed`, head-shuffled) copy of `ckpt` to `output`."""
    geom = ckpt.family.geometry(ckpt.config)
    plan = expansion_plan(geom.num_layers, geom.num_heads, geom.n_rep, geom.head_dim, seed)
    write_checkpoint(Converted(ckpt, plan), output, extra_files={}, overwrite=overwrite)
    return output
