"""`kvconvert calibrate`."""

from __future__ import annotations

import time
from pathlib import Path

from kvconvert.checkpoint import resolve
from kvconvert.cli import app, options
from kvconvert.pipeline import CalibrationRequest, run_calibration
from kvconvert.progress import RichProgress


@app.command()
def calibrate(
    model: str = options.Model,
    dataset: str = options.Dataset,
    samples: int = options.Samples,
    seq_len: int = options.SeqLen,
    batch_size: int = options.BatchSize,
    device: str = options.Device,
    dtype: str = options.Dtype,
    seed: int = options.Seed,
    text_field: str = options.TextField,
    output: Path = options.Output,
) -> None:
    """Run calibration text through MODEL and save the attention-input statistics (one file, every ratio)."""
    t0 = time.perf_counter()
    req = CalibrationRequest(dataset, samples, seq_len, batch_size, seed, text_field, device, dtype)
    with RichProgress() as progress:
        stats = run_calibration(resolve(model), req, progress)
    stats.save(output)
    print(f"wrote {output}: {stats.n_tokens} tokens, {stats.num_layers} layers in {time.perf_counter() - t0:.1f}s")
