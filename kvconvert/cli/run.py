"""`kvconvert run`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from kvconvert.cli import app
from kvconvert.progress import RichProgress
from kvconvert.recipe import describe, load_recipe

RecipeFile = typer.Argument(..., help="Recipe YAML (see recipes/): model, calibrate, compress, eval, push.")
Overrides = typer.Option(
    None, "--set", help="Override a key: --set compress.heads=4 --set push.repo_id=me/model (repeatable)."
)


@app.command("run")
def run_command(
    recipe: Path = RecipeFile,
    overrides: list[str] = Overrides,
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate the recipe and print its steps; run nothing."),
) -> None:
    """Run a recipe end to end; every step is recorded in the output's kvconvert.json and model card."""
    from kvconvert.workflow import run_recipe

    parsed = load_recipe(recipe, list(overrides or []))
    if dry_run:
        print("\n".join(describe(parsed)))
        return
    with RichProgress() as progress:
        result = run_recipe(parsed, progress)
    console = Console()
    plan = result.compress.plan
    console.print(f"{plan.num_kv_heads_before} -> {plan.num_kv_heads_after} KV heads: wrote {result.output}")
    if result.evaluation and "comparison" in result.evaluation:
        ev = result.evaluation
        console.print(
            f"perplexity {ev['baseline']['perplexity']:.3f} -> {ev['model']['perplexity']:.3f} "
            f"({ev['dataset']}, {ev['samples']} x {ev['seq_len']} tokens)"
        )
    if result.push:
        console.print(f"pushed to {result.push.repo_id}: {result.push.pr_url or result.push.commit_url}")
    table = Table(title="time by stage")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage, secs in result.timings.items():
        table.add_row(stage, f"{secs:.1f}")
    console.print(table)
