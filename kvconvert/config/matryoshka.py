"""The MatryoshkaKV stage's config (a recipe's `matryoshka` section; see `kvconvert matryoshka`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from kvconvert.config.base import INPUT, MERGE, OUTPUT, TRAINING, StageConfig, setting
from kvconvert.config.stages import (
    TEXT_FIELD_HELP,
    Dtype,
    device_field,
    dtype_field,
    output_field,
    overwrite_field,
)


class MatryoshkaConfig(StageConfig):
    """Orthogonal per-head key/value projections, trained so any leading slice works, and per-head rates."""

    budget: float = setting(0.5, "Kept share of the KV cache (0-1], over all layers and heads.", MERGE, gt=0, le=1)
    datasets: list[str] = setting(
        ..., "Calibration text (repeatable): a local file or alias.", TRAINING, flag="dataset", metavar="SRC"
    )
    text_field: str | None = setting(None, TEXT_FIELD_HELP, TRAINING, metavar="COL")
    samples: int = setting(64, "Training/PCA windows.", TRAINING, ge=1, metavar="N")
    heldout: int = setting(8, "Held-out windows that score the rate search.", TRAINING, ge=1, metavar="N")
    seq_len: int = setting(128, "Tokens per window.", TRAINING, ge=2, metavar="N")
    rate_step: int | None = setting(None, "Rates are multiples of this (default head_dim/8).", MERGE, ge=1)
    steps: int = setting(200, "Training steps (0: PCA only).", TRAINING, ge=0)
    batch_size: int = setting(2, "Windows per training step.", TRAINING, ge=1)
    lr: float = setting(1e-3, "Adam learning rate of the Cayley parameters.", TRAINING, gt=0)
    kl_weight: float = setting(1.0, "Weight of KL(original ‖ cut).", TRAINING, ge=0)
    ce_weight: float = setting(0.0, "Weight of next-token cross-entropy.", TRAINING, ge=0)
    search: bool = setting(True, "Search per-head rates: moves of dims between heads from the uniform cut.", MERGE)
    search_evals: int = setting(
        16, "Held-out forwards the rate search may spend on candidate moves (each kept only if it helps).", MERGE, ge=0
    )
    search_objective: Literal["kl", "ce"] = setting(
        "ce", "What the rate search lowers on the held-out windows: next-token CE, or the KL to the original.", MERGE
    )
    values_only: bool = setting(False, "Cut values only; keys keep every dim.", MERGE)
    fold_values: bool = setting(
        False, "With --values-only: write a stock checkpoint with the cut folded into v_proj.", OUTPUT
    )
    seed: int = setting(0, "Seed for data order and sampled rates.", TRAINING)
    device: str = device_field(TRAINING)
    dtype: Dtype = dtype_field(TRAINING)


class MatryoshkaRunRequest(MatryoshkaConfig):
    """A whole `kvconvert matryoshka` run: the settings plus where to read and write."""

    model: str = setting(..., "Checkpoint directory, .gguf file, or `smollm2` (built-in, offline).", INPUT)
    output: Path = output_field()
    overwrite: bool = overwrite_field("Replace a non-empty output.")
