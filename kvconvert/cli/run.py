"""`kvconvert run`."""

from __future__ import annotations

from pathlib import Path

from kvconvert.cli import app
from kvconvert.cli.options import argument, command, flag
from kvconvert.cli.summary import emit
from kvconvert.config.base import INPUT, OUTPUT

EXTRA = (
    argument("recipe", Path, "Recipe YAML (see recipes/): model, calibrate, compress, heal, eval, push.", "FILE"),
    flag(
        None,
        "--set",
        help="Override a key: --set compress.heads=4 --set push.repo_id=me/model (repeatable).",
        panel=INPUT,
        kind=list[str],
        metavar="KEY=VALUE",
    ),
    flag(False, "--dry-run", help="Validate the recipe and print its steps; run nothing.", panel=OUTPUT),
    flag(False, "--json", help="Print a JSON summary.", panel=OUTPUT),
)


@command(app, "run", extra=EXTRA)
def run_command(recipe: Path, set: list[str] | None, dry_run: bool, json: bool) -> None:
    """Run a recipe end to end; every step is recorded in the output's kvconvert.json and model card."""
    from kvconvert.recipe import describe, load_recipe

    parsed = load_recipe(recipe, list(set or []))
    if dry_run:
        emit("run", {"dry_run": True, "steps": describe(parsed)}, json, "\n".join(describe(parsed)))
        return
    from kvconvert.cli.compress import summary
    from kvconvert.cli.summary import stage_table
    from kvconvert.console import make_console
    from kvconvert.progress import RichProgress
    from kvconvert.workflow import run_recipe

    with RichProgress(enabled=not json) as progress:
        result = run_recipe(parsed, progress)
    push = (
        {"repo_id": result.push.repo_id, "url": result.push.pr_url or result.push.commit_url} if result.push else None
    )
    data = {"compress": summary(result.compress), "evaluation": result.evaluation, "push": push}
    emit("run", {"dry_run": False, "output": str(result.output), **data, "timings": result.timings}, json)
    if json:
        return
    console = make_console()
    plan = result.compress.plan
    console.print(f"{plan.num_kv_heads_before} -> {plan.num_kv_heads_after} KV heads: wrote {result.output}")
    if result.evaluation and "comparison" in result.evaluation:
        ev = result.evaluation
        console.print(
            f"perplexity {ev['baseline']['perplexity']:.3f} -> {ev['model']['perplexity']:.3f} "
            f"({ev['dataset']}, {ev['samples']} x {ev['seq_len']} tokens)"
        )
    if result.push:
        console.print(f"pushed to {push['repo_id']}: {push['url']}")
    stage_table(console, result.timings, total=False)
