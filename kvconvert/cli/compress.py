"""`kvconvert compress`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from kvconvert.cli import app, options
from kvconvert.decompose import GROUPINGS
from kvconvert.heal import HealRequest
from kvconvert.merge.methods import METHODS
from kvconvert.pipeline import CalibrationRequest, CompressRequest, CompressResult, RefineRequest, run_compress
from kvconvert.progress import RichProgress
from kvconvert.refine import INPUTS
from kvconvert.textdata import SELF


@app.command()
def compress(
    model: str = options.Model,
    heads: str = typer.Option(..., "--heads", help="Fraction of current KV heads (0.25) or a count (1, 4)."),
    stats: str = typer.Option(None, "--stats", help="Statistics from `kvconvert calibrate` (else calibrate now)."),
    method: str = typer.Option("weighted", "--method", help=f"Merge method: {', '.join(METHODS)}."),
    grouping: str = typer.Option("search", "--grouping", help=f"Head grouping: {', '.join(GROUPINGS)}."),
    dataset: str = options.Dataset,
    samples: int = options.Samples,
    seq_len: int = options.SeqLen,
    batch_size: int = options.BatchSize,
    device: str = options.Device,
    dtype: str = options.Dtype,
    seed: int = options.Seed,
    text_field: str = options.TextField,
    offload_dir: str = options.OffloadDir,
    output: Path = options.Output,
    refine_steps: int = typer.Option(
        0, "--refine-steps", min=0, help="Adam steps per layer fitting each merged attention block (0: off)."
    ),
    refine_lr: float = typer.Option(0.02, "--refine-lr", help="Refinement step size, relative to each weight's RMS."),
    refine_samples: int = typer.Option(16, "--refine-samples", min=1, help="Calibration windows used to refine."),
    refine_inputs: str = typer.Option(
        "sequential", "--refine-inputs", help="sequential (refined earlier layers) or original (original inputs)."
    ),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Reload the output with stock transformers."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors shard."),
    heal_tokens: int = typer.Option(
        None, "--heal-tokens", min=1, help="Then heal the output with N tokens (`kvconvert heal` defaults)."
    ),
    protect_retrieval: str = typer.Option(
        None, "--protect-retrieval", help="A `kvconvert profile` JSON: keep retrieval heads apart in the grouping."
    ),
    allow_pickle: bool = options.AllowPickle,
    trust_remote_code: bool = options.TrustRemoteCode,
    allow_missing_tokenizer: bool = typer.Option(
        False, "--allow-missing-tokenizer", help="Write the output even if MODEL has no tokenizer files."
    ),
) -> None:
    """Merge MODEL's KV heads down to --heads and write a stock checkpoint to --output."""
    if method not in METHODS:
        raise typer.BadParameter(f"choose from {', '.join(METHODS)}", param_hint="--method")
    if grouping not in GROUPINGS:
        raise typer.BadParameter(f"choose from {', '.join(GROUPINGS)}", param_hint="--grouping")
    if refine_inputs not in INPUTS:
        raise typer.BadParameter(f"choose from {', '.join(INPUTS)}", param_hint="--refine-inputs")
    req = CompressRequest(
        model=model,
        heads=heads,
        output=output,
        method=method,
        grouping=grouping,
        stats=options.path_or_none(stats),
        calibration=CalibrationRequest(
            dataset, samples, seq_len, batch_size, seed, text_field, device, dtype, options.path_or_none(offload_dir)
        ),
        refine=RefineRequest(refine_steps, refine_lr, refine_samples, refine_inputs),
        verify=verify,
        overwrite=overwrite,
        max_shard_size=max_shard_size,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        allow_missing_tokenizer=allow_missing_tokenizer,
        protect_retrieval=options.path_or_none(protect_retrieval),
    )
    if heal_tokens:
        req.heal = HealRequest(
            student=str(output),
            teacher=model,
            output=output,
            datasets=[dataset] if dataset == SELF else [dataset, SELF],
            tokens=heal_tokens,
            seq_len=min(seq_len, 512),
            seed=seed,
            text_field=text_field,
            device=device,
            dtype=dtype,
            overwrite=True,
            max_shard_size=max_shard_size,
        )
    with RichProgress() as progress:
        result = run_compress(req, progress)
    report(result)


def report(result: CompressResult) -> None:
    plan = result.plan
    console = Console()
    keys = sum(lp.retained("key") for lp in plan.layers) / len(plan.layers)
    values = sum(lp.retained("value") for lp in plan.layers) / len(plan.layers)
    console.print(
        f"{plan.num_kv_heads_before} -> {plan.num_kv_heads_after} KV heads ({plan.method}, {plan.grouping}); "
        f"mean retained energy: keys {keys:.3f}, values {values:.3f}"
    )
    if result.verify:
        console.print(f"verified: stock reload matches (max |Δlogit| {result.verify.max_abs_diff:.2e})")
    if result.heal:
        h = result.heal.record["heal"]
        console.print(f"healed in place: {h['tokens']} tokens ({h['train']}), final KL {h['final_loss']:.4f}")
    table = Table(title="time by stage")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage, secs in result.timings.items():
        table.add_row(stage, f"{secs:.1f}")
    table.add_row("total", f"{sum(result.timings.values()):.1f}")
    console.print(table)
    console.print(f"wrote {result.output}")
