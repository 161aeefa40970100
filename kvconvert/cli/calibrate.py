"""`kvconvert calibrate`."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from kvconvert.checkpoint import resolve
from kvconvert.cli import app, options
from kvconvert.distributed import current_part
from kvconvert.pipeline import CalibrationRequest, run_calibration
from kvconvert.preflight import check_source
from kvconvert.progress import RichProgress
from kvconvert.stats import stats_output


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
    offload_dir: str = options.OffloadDir,
    output: Path = options.Output,
    allow_pickle: bool = options.AllowPickle,
    trust_remote_code: bool = options.TrustRemoteCode,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing statistics file."),
) -> None:
    """Run calibration text through MODEL and save the attention-input statistics (one file, every ratio).

    Launch with `torchrun --nproc_per_node N` (or `accelerate launch`) to split the windows across processes.
    """
    t0 = time.perf_counter()
    req = CalibrationRequest(
        dataset, samples, seq_len, batch_size, seed, text_field, device, dtype, options.path_or_none(offload_dir)
    )
    with current_part() as part, RichProgress(enabled=part.is_main) as progress:
        ckpt = resolve(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        check_source(ckpt, require_tokenizer=False)
        with stats_output(output, overwrite, inputs=[ckpt.path], writer=part.is_main):
            stats = run_calibration(ckpt, req, output, progress, part)
    if part.is_main:
        secs = time.perf_counter() - t0
        print(
            f"wrote {output}: {stats.n_tokens} tokens, {stats.num_layers} layers, {part.world} process(es), {secs:.1f}s"
        )
