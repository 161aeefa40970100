"""Layer read-ahead (`LayerRunner(prefetch=...)`): the calibration layer pass of a random Llama checkpoint with its
page cache dropped before each run, reading each next layer on a thread or not. Prints a table.

    python -m bench.read_ahead [--layers 8] [--hidden 4096] [--tokens 4x64] [--work /tmp/kvc-read-ahead]

Dropping the page cache needs root (`/proc/sys/vm/drop_caches`); without it the runs read from memory.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from pathlib import Path

import torch

from bench.gpu_scale import random_checkpoint
from kvconvert import calibrate
from kvconvert.checkpoint import resolve
from kvconvert.streaming import LayerRunner


def drop_page_cache() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1")
        return True
    except OSError:
        return False


def layer_pass(ckpt, windows: torch.Tensor, prefetch: bool) -> float:
    runner = functools.partial(LayerRunner, prefetch=prefetch)
    original, calibrate.LayerRunner = calibrate.LayerRunner, runner
    try:
        t0 = time.perf_counter()
        calibrate.accumulate(ckpt, windows, len(windows), torch.device("cpu"), torch.float32, lambda *_: None)
        return time.perf_counter() - t0
    finally:
        calibrate.LayerRunner = original


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--tokens", default="4x64", help="windows x tokens")
    ap.add_argument("--work", type=Path, default=Path("/tmp/kvc-read-ahead"))
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    shape = dict(
        layers=a.layers,
        hidden=a.hidden,
        heads=a.hidden // 128,
        kv_heads=a.hidden // 128,
        inter=a.hidden * 11008 // 4096,
    )
    ckpt_dir = a.work / f"llama-{a.layers}x{a.hidden}"
    if not (ckpt_dir / "config.json").exists():
        random_checkpoint(ckpt_dir, shape, torch.device("cpu"), shard="2GB")
    ckpt = resolve(str(ckpt_dir))
    n, t = (int(v) for v in a.tokens.split("x"))
    windows = torch.randint(0, ckpt.config.vocab_size, (n, t), generator=torch.Generator().manual_seed(0))
    size = sum(f.stat().st_size for f in ckpt_dir.glob("*.safetensors"))
    print(
        f"{a.layers} layers x hidden {a.hidden}, {size / 2**30:.2f} GiB bf16, {n} x {t} tokens, "
        f"{torch.get_num_threads()} threads"
    )
    print("| read-ahead | page cache dropped | layer pass (s) |\n|---|---|---:|")
    for _ in range(a.repeats):
        for prefetch in (False, True):
            cold = drop_page_cache()
            seconds = layer_pass(ckpt, windows, prefetch)
            print(f"| {'on' if prefetch else 'off'} | {'yes' if cold else 'no'} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
