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
