"""docs/results/gpu.md is what bench/gpu_report.py renders from the raw results committed beside it."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_results_page_is_rendered_from_the_committed_raw_results(tmp_path):
    out = tmp_path / "gpu.md"
    env = {**os.environ, "KVC_GPU_RAW": str(ROOT / "docs/results/gpu"), "KVC_GPU_REPORT": str(out)}
    subprocess.run([sys.executable, "-m", "bench.gpu_report"], cwd=ROOT, env=env, check=True, capture_output=True)
    assert out.read_text() == (ROOT / "docs/results/gpu.md").read_text()


def test_runtime_rows_pair_the_two_models_at_the_same_point_whatever_the_order():
    """The runtime part measures the largest point first and may be cut short after either model."""
    from bench.gpu_report import pairs

    base = [{"batch": 128, "context": 16384, "x": 1}, {"batch": 16, "context": 4096, "x": 2}]
    base.append({"batch": 8, "context": 8})  # measured for one model only: the run was cut short
    conv = [{"batch": 16, "context": 4096, "x": 3}, {"batch": 128, "context": 16384, "x": 4}]
    assert [(b["x"], c["x"]) for b, c in pairs(base, conv)] == [(2, 3), (1, 4)]
