"""`kvconvert eval`."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from kvconvert.cli import app, options
from kvconvert.evaluate import evaluate
from kvconvert.progress import RichProgress


@app.command("eval")
def eval_command(
    model: str = options.Model,
    baseline: str = typer.Option(None, "--baseline", help="Compare with this model on the same tokens."),
    dataset: str = options.Dataset,
    samples: int = typer.Option(32, "--samples", min=1, help="Number of token windows."),
    seq_len: int = typer.Option(512, "--seq-len", min=2, help="Tokens per window."),
    batch_size: int = options.BatchSize,
    device: str = options.Device,
    dtype: str = options.Dtype,
    seed: int = typer.Option(1, "--seed", help="Seed for `--dataset self` (differs from calibration's 0)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Perplexity and KV-cache bytes per token of MODEL (and of --baseline on the same text)."""
    kwargs = dict(baseline=baseline, dataset=dataset, samples=samples, seq_len=seq_len, batch_size=batch_size)
    kwargs |= dict(seed=seed, device=device, dtype=dtype)
    if as_json:
        print(json.dumps(evaluate(model, **kwargs), indent=2))
        return
    with RichProgress() as progress:
        result = evaluate(model, progress=progress, **kwargs)
    table = Table(title=f"{dataset}: {samples} x {seq_len} tokens")
    for col in ("model", "KV heads", "perplexity", "KV bytes/token"):
        table.add_column(col)
    for role in ("baseline", "model"):
        if role in result:
            r = result[role]
            table.add_row(
                r["path"], str(r["num_key_value_heads"]), f"{r['perplexity']:.3f}", str(r["kv_bytes_per_token"])
            )
    Console().print(table)
