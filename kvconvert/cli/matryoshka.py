"""`kvconvert matryoshka`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from kvconvert.cli import app, options
from kvconvert.matryoshka.run import MatryoshkaRequest, run_matryoshka
from kvconvert.matryoshka.train import TrainConfig
from kvconvert.progress import RichProgress

Datasets = typer.Option(..., "--dataset", help="Calibration text (repeatable): local file or alias.")


@app.command()
def matryoshka(
    model: str = options.Model,
    output: Path = options.Output,
    budget: float = typer.Option(0.5, "--budget", help="Kept share of the KV cache (0-1], over all layers and heads."),
    dataset: list[str] = Datasets,
    samples: int = typer.Option(64, "--samples", min=1, help="Training/PCA windows."),
    heldout: int = typer.Option(4, "--heldout", min=1, help="Held-out windows that score the rate search."),
    seq_len: int = typer.Option(128, "--seq-len", min=2, help="Tokens per window."),
    step: int = typer.Option(None, "--rate-step", min=1, help="Rates are multiples of this (default head_dim/8)."),
    steps: int = typer.Option(200, "--steps", min=0, help="Training steps (0: PCA only)."),
    batch_size: int = typer.Option(2, "--batch-size", min=1, help="Windows per training step."),
    lr: float = typer.Option(1e-3, "--lr", min=0.0, help="Adam learning rate of the Cayley parameters."),
    kl_weight: float = typer.Option(1.0, "--kl-weight", help="Weight of KL(original ‖ cut)."),
    ce_weight: float = typer.Option(0.0, "--ce-weight", help="Weight of next-token cross-entropy."),
    search: bool = typer.Option(True, "--search/--uniform", help="Search per-head rates, or one uniform rate."),
    values_only: bool = typer.Option(False, "--values-only", help="Cut values only; keys keep every dim."),
    fold_values: bool = typer.Option(
        False, "--fold-values", help="With --values-only: write a stock checkpoint with the cut folded into v_proj."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for data order and sampled rates."),
    device: str = options.Device,
    dtype: str = options.Dtype,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output."),
) -> None:
    """Train MatryoshkaKV projections (orthogonal per-head cuts of keys and values) and pick per-head rates."""
    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        kl_weight=kl_weight,
        ce_weight=ce_weight,
        seed=seed,
        values_only=values_only,
    )
    req = MatryoshkaRequest(
        model=model,
        output=output,
        datasets=list(dataset),
        budget=budget,
        samples=samples,
        heldout=heldout,
        seq_len=seq_len,
        step=step,
        train=cfg,
        search=search,
        values_only=values_only,
        fold_values=fold_values,
        device=device,
        dtype=dtype,
        overwrite=overwrite,
    )
    with RichProgress() as progress:
        result = run_matryoshka(req, progress)
    s = result.section
    Console().print(
        f"kept {s['kept_fraction']:.1%} of the KV cache (budget {budget:.1%}); held-out KL {s['heldout_kl']:.4f}"
    )
    Console().print(f"wrote {result.output}")
