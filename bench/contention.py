"""Contention: how much calibrate, decompose and refine slow down when two CPU-bound processes share the machine.

Each stage runs in a fresh process (OpenMP reads its settings when torch loads), first alone, then beside two busy
processes (pure-Python loops, one core each), under two thread policies:

- `kvconvert`: what the CLI does (`kvconvert.threads`): passive OpenMP waits, threads = free physical cores;
- `torch-default`: torch's own defaults (one thread per core, libgomp's spinning waits), for comparison.

Work: SmolLM2-135M-Instruct (built-in), calibration on `pydoc` (16 x 256 tokens), 3 -> 1 KV heads (weighted +
search), refine 4 steps per layer on 4 windows. Times are of the stage itself (model loading excluded).

    python -m bench.contention --write docs/results/contention.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("calibrate", "decompose", "refine")
POLICIES = ("kvconvert", "torch-default")
BUSY = "while True: pass"


def child(stage: str, policy: str, work: Path) -> dict:
    """Run one stage in this process and return its wall and CPU seconds."""
    if policy == "kvconvert":
        from kvconvert import threads

        threads.prepare_environment()
        n = threads.apply(None)  # before torch loads: sets OMP_NUM_THREADS
    else:
        n = None
    import torch

    from kvconvert.checkpoint import resolve
    from kvconvert.converted import Converted
    from kvconvert.pipeline import CalibrationRequest, plan_compression, request_windows, run_calibration
    from kvconvert.refine import RefineOptions, refine
    from kvconvert.stats import CalibrationStats

    cpu = torch.device("cpu")
    ckpt = resolve("smollm2")
    req = CalibrationRequest("pydoc", 16, 256, 8, device="cpu", dtype="float32")
    stats_path = work / "stats.safetensors"
    windows = request_windows(ckpt, req)
    if stage != "calibrate" and not stats_path.exists():
        run_calibration(ckpt, req, stats_path, windows=windows)
    stats = CalibrationStats.load(stats_path) if stats_path.exists() else None
    plan = plan_compression(ckpt, stats, 1, "weighted", "search", cpu) if stage == "refine" else None
    t0, c0 = time.perf_counter(), time.process_time()
    if stage == "calibrate":
        run_calibration(ckpt, req, work / f"stats-{os.getpid()}.safetensors", windows=windows)
    elif stage == "decompose":
        plan_compression(ckpt, stats, 1, "weighted", "search", cpu)
    else:
        opts = RefineOptions(steps=4, lr=0.02, batch_size=4, inputs="sequential")
        refine(Converted(ckpt, plan), windows[:4], opts, work / f"refined-{os.getpid()}", cpu, torch.float32)
    wall, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    for scratch in work.glob(f"*-{os.getpid()}*"):
        shutil.rmtree(scratch) if scratch.is_dir() else scratch.unlink()
    return {"stage": stage, "policy": policy, "threads": n or torch.get_num_threads(), "wall": wall, "cpu": cpu_s}


def run_child(stage: str, policy: str, work: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}
    cmd = [sys.executable, "-m", "bench.contention", "--child", stage, "--policy", policy, "--workdir", str(work)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(work: Path, busy: int, policies: tuple[str, ...]) -> list[dict]:
    procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
    try:
        time.sleep(1.0 if busy else 0.0)
        rows = []
        for policy in policies:
            for stage in STAGES:
                load = os.getloadavg()[0]
                row = run_child(stage, policy, work) | {"busy": busy, "loadavg_at_start": load}
                print(json.dumps(row), flush=True)
                rows.append(row)
        return rows
    finally:
        for p in procs:
            p.terminate()
            p.wait()


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| policy | stage | threads alone / busy | alone (s) | with 2 busy (s) | slowdown | CPU alone / busy (s) |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    by = {(r["policy"], r["stage"], r["busy"]): r for r in rows}
    for policy in dict.fromkeys(r["policy"] for r in rows):
        for stage in STAGES:
            a, b = by.get((policy, stage, 0)), by.get((policy, stage, 2))
            if not (a and b):
                continue
            lines.append(
                f"| {policy} | {stage} | {a['threads']} / {b['threads']} | {a['wall']:.1f} | {b['wall']:.1f} | "
                f"{b['wall'] / a['wall']:.1f}x | {a['cpu']:.1f} / {b['cpu']:.1f} |"
            )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path(".bench-cache/contention"))
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    ap.add_argument("--write", type=Path, help="Markdown file for the table")
    ap.add_argument("--note", default="", help="Conditions of the run, written under the table")
    ap.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    ap.add_argument("--policy", choices=POLICIES, default="kvconvert", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.child:
        print(json.dumps(child(args.child, args.policy, args.workdir)))
        return
    policies = tuple(args.policies)
    rows = measure(args.workdir, 0, policies) + measure(args.workdir, 2, policies)
    loads = ", ".join(f"{r['loadavg_at_start']:.1f}" for r in rows)
    lines = [
        "# Contention: two busy processes beside calibrate, decompose and refine",
        "",
        f"Command: `python -m bench.contention --write {args.write or 'FILE'}` on {os.cpu_count()} CPUs "
        "(SmolLM2-135M-Instruct, 16 x 256 tokens of `pydoc`, 3 -> 1 KV heads, refine 4 steps x 30 layers on 4 "
        "windows; stage time only). `kvconvert` is the CLI's thread policy (passive OpenMP waits, one thread per "
        "free physical core); `torch-default` is torch's own (a thread per core, spinning waits).",
        "",
        *table(rows),
        "",
        f"Load average when each run started: {loads}.",
    ]
    if args.note:
        lines += ["", args.note]
    print("\n".join(lines))
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
