"""`kvconvert profile`: data-free retrieval-head profile (RazorAttention) of MODEL."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from kvconvert.cli import app, options


@app.command("profile")
def profile_command(
    model: str = options.Model,
    output: Path = options.Output,
    block: int = typer.Option(512, "--block", min=16, help="Random tokens per block (the block is repeated)."),
    repeats: int = typer.Option(4, "--repeats", min=2, help="Copies of the block."),
    seeds: int = typer.Option(3, "--seeds", min=1, help="Random sequences averaged (selection stability over them)."),
    induction: float = typer.Option(0.14, "--induction", min=0, max=1, help="Fraction of KV heads by induction."),
    echo: float = typer.Option(0.01, "--echo", min=0, max=1, help="Fraction of KV heads by echo."),
    sinks: int = typer.Option(4, "--sinks", min=0, help="Runtime: first tokens every windowed head keeps."),
    window_floor: int = typer.Option(256, "--window-floor", min=1, help="Runtime: smallest recent window."),
    window_fraction: float = typer.Option(0.1, "--window-fraction", min=0, max=1, help="Runtime: window/context."),
    attach: bool = typer.Option(False, "--attach", help="Also store the profile in MODEL (a checkpoint directory)."),
    device: str = options.Device,
    dtype: str = options.Dtype,
) -> None:
    """Score every KV head for echo and induction on repeated random tokens; select the retrieval heads."""
    from kvconvert.razor.run import ProfileRequest, run_profile

    req = ProfileRequest(model, block, repeats, tuple(range(seeds)), induction, echo, device, dtype)
    runtime = {"sinks": sinks, "window_floor": window_floor, "window_fraction": window_fraction, "compensation": True}
    result = run_profile(req, output, runtime, attach)
    s = result["stability"]
    n = sum(map(len, result["retrieval"]))
    total = len(result["retrieval"]) * result["num_kv_heads"]
    Console().print(
        f"{n} of {total} KV heads are retrieval heads; selection Jaccard vs each seed: "
        f"mean {s['jaccard_mean']:.3f}, min {s['jaccard_min']:.3f}; wrote {output}"
    )
