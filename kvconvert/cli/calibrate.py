"""`kvconvert calibrate`."""

from __future__ import annotations

import time

from kvconvert.cli import app
from kvconvert.cli.options import Group, command, flag
from kvconvert.cli.summary import emit, stage_table
from kvconvert.config import CalibrateRequest

OPTIONS = Group(CalibrateRequest, arguments=("model",))


@command(app, "calibrate", OPTIONS, extra=(flag(False, "--json", help="Print a JSON summary.", panel="Output"),))
def calibrate(req: CalibrateRequest, json: bool) -> None:
    """Run calibration text through MODEL and save the attention-input statistics (one file, every ratio).

    Launch with `torchrun --nproc_per_node N` (or `accelerate launch`) to split the windows across processes.
    """
    from kvconvert.distributed import current_part
    from kvconvert.io.staging import check_output_first
    from kvconvert.pipeline import run_calibration
    from kvconvert.preflight import check_source
    from kvconvert.progress import RichProgress
    from kvconvert.stats import stats_output

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    with current_part() as part, RichProgress(enabled=part.is_main and not json) as progress:
        check_output_first(req.output, req.model, overwrite=req.overwrite, directory=False)
        ckpt = req.resolve(progress)
        check_source(ckpt, require_tokenizer=False)
        timings["load"] = time.perf_counter() - t0
        with stats_output(req.output, req.overwrite, inputs=[ckpt.path], writer=part.is_main):
            stats = run_calibration(ckpt, req, req.output, progress, part, timings=timings)
    if part.is_main:
        secs = time.perf_counter() - t0
        summary = {"output": str(req.output), "tokens": stats.n_tokens, "layers": stats.num_layers}
        emit(
            "calibrate",
            {**summary, "processes": part.world, "seconds": secs, "timings": timings},
            json,
            f"wrote {req.output}: {stats.n_tokens} tokens, {stats.num_layers} layers, {part.world} process(es), "
            f"{secs:.1f}s",
        )
        if not json:
            from kvconvert.console import make_console

            stage_table(make_console(), timings, total=False)
