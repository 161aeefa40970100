"""Runtime benchmark: KV bytes, decode tokens/s and peak memory of stock `generate()`, base vs converted.

Converts SmolLM2-135M-Instruct 3 -> 1 KV heads (unless --model is given), then measures both models at each
context with `kvconvert eval --contexts` (each point in a fresh child process: warm-up, median of repeats; the
KV cache that `generate()` returns is measured against the computed size) and fits the memory generate() adds
over the loaded model = a + b x context to find the longest context that fits --budget.

    python -m bench.runtime --write docs/results/runtime.md
    python -m bench.runtime --device cuda --batch 8 --contexts 2048,8192,32768 --budget 16 --write ...  # on a GPU
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

from bench.corpora import pydoc_split
from kvconvert.evaluation import evaluate
from kvconvert.pipeline import CalibrationRequest, CompressRequest, run_compress


def added(p: dict) -> int:
    """Bytes a measured generate() needed on top of the loaded, warmed-up model."""
    return p["peak_memory_bytes"] - p["model_memory_bytes"]


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs) or 1.0
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var
    return my - slope * mx, slope


def device_name(device: str) -> str:
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="converted checkpoint (default: convert SmolLM2 3 -> 1 KV heads first)")
    ap.add_argument("--baseline", default="smollm2")
    ap.add_argument("--contexts", default="512,2048,8192")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1, help="sequences per generate() call")
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--budget",
        default="1.0",
        help="GiB that generate() may add over the loaded model, for the longest-context column",
    )
    ap.add_argument("--workdir", type=Path, default=Path(".bench-cache/runtime"))
    ap.add_argument("--write", type=Path)
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    text_a, text_b = pydoc_split()
    model = args.model
    if model is None:
        model = str(args.workdir / "smollm2-1kv")
        cal = CalibrationRequest(dataset=str(text_a), samples=32, seq_len=512, batch_size=8, device=args.device)
        run_compress(CompressRequest(args.baseline, "1", Path(model), calibration=cal, overwrite=True))
    report = evaluate(
        model,
        baseline=args.baseline,
        dataset=str(text_b),
        samples=4,
        seq_len=512,
        contexts=contexts,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        runtime_batch=args.batch,
        device=args.device,
    )
    budget = float(args.budget) * 2**30
    kind = report["model"]["runtime"][0]["peak_memory_kind"]
    lines = [
        "# Runtime benchmark",
        "",
        f"Command: `python -m bench.runtime {' '.join(sys.argv[1:])}`",
        "",
        f"Device: {device_name(args.device)}; dtype {report['dtype']}; batch {args.batch}; {args.new_tokens} new "
        f"tokens per measurement (decode speed timed over the last {args.new_tokens - 1} steps), median of "
        f"{args.repeats} after a warm-up; each point in a child process. `model` = memory in use after loading and "
        "a 2-token warm-up generate (weights touched, no real cache); `peak` = peak memory of the first "
        f"full-length `generate()` call ({kind}: the peak is reset after loading, so it excludes the loading "
        "transient); "
        "`added` = peak − model, what generating at that context costs.",
        "",
        "| model | KV heads | KV bytes/token | context | KV cache MiB | real cache | prefill s | decode tok/s "
        "| model MiB | peak MiB | added MiB |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    fits = {}
    for role in ("baseline", "model"):
        r = report[role]
        kv = r["kv_cache"]
        for p in r["runtime"]:
            c = p["context"]
            real = "= computed" if p["cache_matches"] else f"{p['measured_cache_bytes'] / 2**20:.1f} (differs)"
            lines.append(
                f"| {role} | {r['num_key_value_heads']} | {kv['bytes_per_token']} | {c} | "
                f"{args.batch * kv['bytes_at_context'][str(c)] / 2**20:.1f} | {real} | {p['prefill_seconds']:.2f} | "
                f"{p['decode_tokens_per_second']:.1f} | {p['model_memory_bytes'] / 2**20:.0f} | "
                f"{p['peak_memory_bytes'] / 2**20:.0f} | {added(p) / 2**20:.0f} |"
            )
        fits[role] = fit_line([p["context"] for p in r["runtime"]], [added(p) for p in r["runtime"]])
    lines += [
        "",
        f"Longest context whose `generate()` adds at most {args.budget} GiB over the loaded model (least-squares "
        "line through the `added` column):",
        "",
    ]
    lines += ["| model | fixed MiB | MiB per 1k tokens | longest context |", "|---|---:|---:|---:|"]
    for role, (a, b) in fits.items():
        longest = int((budget - a) / b) if b > 0 else float("inf")
        lines.append(f"| {role} | {a / 2**20:.0f} | {b * 1024 / 2**20:.1f} | {longest} |")
    c = report["comparison"]
    lines += [
        "",
        "Converted vs baseline:",
        "",
        "| context | decode speedup | peak memory saved MiB |",
        "|---:|---:|---:|",
    ]
    for ctx, speedup in c["decode_speedup_at_context"].items():
        saved = c["peak_memory_saved_bytes_at_context"][ctx] / 2**20
        lines.append(f"| {ctx} | x{speedup:.2f} | {saved:.0f} |")
    entries = [report[role] for role in ("baseline", "model")]
    checks = [e["kv_cache"]["measured_matches"] for e in entries] + [
        p["cache_matches"] for e in entries for p in e["runtime"]
    ]
    lines += [
        "",
        f"KV bytes/token x{c['kv_bytes_ratio']:.4f} (KV heads x{c['kv_heads_ratio']:.4f}); the DynamicCache measured "
        f"after a forward pass and after every generate() equals the computed size: {all(checks)}. Held-out "
        f"perplexity ({report['samples']} x {report['seq_len']} tokens of pydoc-b): "
        f"{report['baseline']['perplexity']:.2f} -> {report['model']['perplexity']:.2f}.",
        "",
    ]
    if not torch.cuda.is_available():
        lines += ["No GPU was available for this run; GPU numbers are not included.", ""]
    text = "\n".join(lines)
    print(text)
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(text)


if __name__ == "__main__":
    main()
