"""`kvconvert heal`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from kvconvert.cli import app, options
from kvconvert.distributed import end_process_group
from kvconvert.heal import HealRequest, HealResult, run_heal
from kvconvert.heal.trainable import TRAIN_MODES
from kvconvert.progress import RichProgress

Datasets = typer.Option(
    ["self"],
    "--dataset",
    help="Training text (repeatable): a local file, dataset alias or Hub id; `self` samples the teacher to "
    "fill the token budget. Without `self`, short text is repeated in new orders.",
)


@app.command()
def heal(
    student: str = typer.Argument(..., help="The converted checkpoint to heal (e.g. the output of `compress`)."),
    teacher: str = typer.Option(..., "--teacher", help="The original model the student was converted from."),
    dataset: list[str] = Datasets,
    output: Path = options.Output,
    tokens: int = typer.Option(100_000, "--tokens", min=1, help="Distillation tokens (rounded up to whole steps)."),
    steps: int = typer.Option(None, "--steps", min=1, help="Optimizer steps (overrides --tokens)."),
    seq_len: int = typer.Option(512, "--seq-len", min=2, help="Tokens per window."),
    batch_size: int = typer.Option(2, "--batch-size", min=1, help="Windows per step and process."),
    lr: float = typer.Option(3e-4, "--lr", min=0.0, help="Peak learning rate (AdamW, warm-up then cosine)."),
    train: str = typer.Option("attn", "--train", help=f"Trainable parameters: {', '.join(TRAIN_MODES)}."),
    lora_rank: int = typer.Option(16, "--lora-rank", min=1, help="LoRA rank for --train lora."),
    kl_weight: float = typer.Option(1.0, "--kl-weight", help="Weight of KL(teacher ‖ student)."),
    ce_weight: float = typer.Option(0.0, "--ce-weight", help="Weight of next-token cross-entropy."),
    temperature: float = typer.Option(1.0, "--temperature", help="Softmax temperature of the KL term."),
    seed: int = typer.Option(0, "--seed", help="Seed for data order and `self` sampling."),
    text_field: str = options.TextField,
    device: str = options.Device,
    dtype: str = options.Dtype,
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", min=1, help="Steps between saved states."),
    state_dir: str = typer.Option(None, "--state-dir", help="Where states go (default: OUTPUT.heal-state)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last state."),
    keep_state: bool = typer.Option(False, "--keep-state", help="Keep the state directory after success."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output (or the student)."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors shard."),
) -> None:
    """Distil STUDENT from --teacher (KL on next-token distributions) and write a stock checkpoint to --output."""
    if train not in TRAIN_MODES:
        raise typer.BadParameter(f"choose from {', '.join(TRAIN_MODES)}", param_hint="--train")
    req = HealRequest(
        student=student,
        teacher=teacher,
        output=output,
        datasets=list(dataset),
        tokens=tokens,
        steps=steps,
        seq_len=seq_len,
        batch_size=batch_size,
        lr=lr,
        train=train,
        lora_rank=lora_rank,
        kl_weight=kl_weight,
        ce_weight=ce_weight,
        temperature=temperature,
        seed=seed,
        text_field=text_field,
        device=device,
        dtype=dtype,
        checkpoint_every=checkpoint_every,
        state_dir=options.path_or_none(state_dir),
        resume=resume,
        overwrite=overwrite,
        keep_state=keep_state,
        max_shard_size=max_shard_size,
    )
    try:
        with RichProgress() as progress:
            result = run_heal(req, progress)
    finally:
        end_process_group()  # under `accelerate launch`: gloo aborts a process that exits with its group alive
    if result is not None:
        report(result)


def report(result: HealResult) -> None:
    h = result.record["heal"]
    console = Console()
    console.print(
        f"healed {h['tokens']} tokens in {h['steps']} steps ({h['train']}, {h['processes']} process(es)); "
        f"final loss {h['final_loss']:.4f}; {result.seconds:.0f}s"
    )
    if result.verify:
        console.print(f"verified: stock reload matches (max |Δlogit| {result.verify.max_abs_diff:.2e})")
    console.print(f"wrote {result.output}")
