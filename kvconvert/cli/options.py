"""Options shared by several commands."""

from __future__ import annotations

from pathlib import Path

import typer

Model = typer.Argument(..., help="Checkpoint directory, Hub id, .gguf file, or `smollm2` (built-in, offline).")
Dataset = typer.Option(
    "self", "--dataset", help="wikitext|c4|fineweb-edu|pile-val, a Hub dataset id, a local file, or `self`."
)
Samples = typer.Option(128, "--samples", min=1, help="Number of token windows.")
SeqLen = typer.Option(2048, "--seq-len", min=2, help="Tokens per window.")
BatchSize = typer.Option(1, "--batch-size", min=1, help="Windows per forward pass.")
Device = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
Dtype = typer.Option("auto", "--dtype", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16.")
Seed = typer.Option(0, "--seed", help="Seed for `--dataset self` sampling.")
TextField = typer.Option(None, "--text-field", help="Text column of the dataset (default: `text`).")
OffloadDir = typer.Option(
    None, "--offload-dir", help="Keep the calibration hidden states in a file here instead of in memory."
)
Output = typer.Option(..., "--output", "-o", help="Where to write the result.")
AllowPickle = typer.Option(
    False, "--allow-pickle", help="Read pytorch_model*.bin weights (with torch.load(weights_only=True))."
)
TrustRemoteCode = typer.Option(
    False, "--trust-remote-code", help="Let transformers run the checkpoint's own Python code (auto_map)."
)


def path_or_none(value: str | None) -> Path | None:
    return Path(value) if value else None
