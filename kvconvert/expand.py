"""Expand a GQA checkpoint to more KV heads (each a copy of the KV head its queries read), optionally shuffled.

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


def expansion_plan(
    num_layers: int,
    num_heads: int,
    n_rep: int,
    head_dim: int,
    seed: int | None,
    n_new: int | None = None,
) -> CompressionPlan:
    """Identity maps, `n_new` KV heads (default: one per query head); `seed` shuffles the heads per layer."""
    n_new = n_new or num_heads
    per = num_heads // n_new
    if num_heads % n_new or (n_new * n_rep) % num_heads:
        raise ValueError(f"cannot expand {num_heads // n_rep} KV heads to {n_new} for {num_heads} query heads")
    eye = torch.eye(head_dim, dtype=torch.float64)
    ident = HeadMerge(0.0, 0.0, 0.0, 0.0, eye, eye, eye, eye)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    layers = []
    for _ in range(num_layers):
        order = torch.randperm(n_new, generator=gen).tolist() if gen else list(range(n_new))
        heads = []
        for j in order:
            queries = tuple(range(j * per, (j + 1) * per))
            heads.append(NewHead(queries, (queries[0] // n_rep,), ident))
        layers.append(LayerPlan(tuple(heads)))
    return CompressionPlan(
        "expand", "shuffled" if seed is not None else "identity", num_heads // n_rep, n_new, tuple(layers)
    )


def expand(ckpt: Checkpoint, output: Path, n_new: int | None = None, seed: int | None = None, overwrite=False) -> Path:
    """Write the copy of `ckpt` with `n_new` KV heads (default MHA; with `seed`, heads shuffled) to `output`."""
    geom = ckpt.family.geometry(ckpt.config)
    plan = expansion_plan(geom.num_layers, geom.num_heads, geom.n_rep, geom.head_dim, seed, n_new)
    write_checkpoint(Converted(ckpt, plan), output, extra_files={}, overwrite=overwrite)
    return output


def expand_to_mha(ckpt: Checkpoint, output: Path, seed: int | None = None, overwrite: bool = False) -> Path:
    """Write the MHA-expanded (and, with `seed`, head-shuffled) copy of `ckpt` to `output`."""
    return expand(ckpt, output, None, seed, overwrite)
