"""Refinement inputs: original vs sequential, on the real SmolLM2-135M-Instruct 3 -> 1 KV heads.

`--refine-inputs original` fits each merged attention block on the original model's inputs to that layer;
`sequential` (the default) fits it on the inputs the converted model really sees, with the earlier layers already
refined (as GPTQ does). Both use the same closed-form start (weighted + search, 32 x 512 calibration windows of
pydoc-a), 30 Adam steps per layer on 16 of those windows, and are scored on held-out pydoc-b (16 x 512).

    python -m bench.refine_inputs --write docs/results/refine-inputs.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.corpora import pydoc_split
from kvconvert.checkpoint import resolve
from kvconvert.converted import Converted
from kvconvert.evaluation.perplexity import perplexity
from kvconvert.modeling import load_model, load_tokenizer
from kvconvert.pipeline import CalibrationRequest, plan_compression, request_windows, run_calibration
from kvconvert.refine import INPUTS, RefineOptions, refine
from kvconvert.textdata import iter_texts, token_windows
from kvconvert.verify import converted_in_memory

CPU = torch.device("cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path(".bench-cache/refine-inputs"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--write", type=Path, help="Markdown file for the table")
    args = ap.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    text_a, text_b = pydoc_split()
    base = resolve("smollm2")
    held_out = token_windows(load_tokenizer(base), iter_texts(str(text_b)), 16, 512, "b")
    original = perplexity(load_model(base, CPU, torch.float32), held_out, 4)

    t0 = time.perf_counter()
    req = CalibrationRequest(dataset=str(text_a), samples=32, seq_len=512, batch_size=8, device="cpu")
    windows = request_windows(base, req)
    stats = run_calibration(base, req, work / "stats.safetensors", windows=windows)
    plan = plan_compression(base, stats, 1, "weighted", "search", CPU)
    calib_merge = time.perf_counter() - t0
    merged = perplexity(converted_in_memory(Converted(base, plan)), held_out, 4)
    print(f"original {original:.2f}  merged {merged:.2f}  calibrate+merge {calib_merge:.1f}s", flush=True)

    rows = []
    for inputs in INPUTS:
        t0 = time.perf_counter()
        opts = RefineOptions(steps=args.steps, inputs=inputs)
        conv, records = refine(Converted(base, plan), windows[:16], opts, work / f"refined-{inputs}", CPU)
        secs = time.perf_counter() - t0
        ppl = perplexity(converted_in_memory(conv), held_out, 4)
        before = sum(r["error_before"] for r in records) / len(records)
        after = sum(r["error_after"] for r in records) / len(records)
        rows.append((inputs, ppl, before, after, secs))
        print(f"{inputs:10s} {ppl:8.2f}  layer error {before:.4f} -> {after:.4f}  {secs:.1f}s", flush=True)

    lines = [
        "# Refinement inputs: original vs sequential (SmolLM2-135M-Instruct 3 -> 1 KV heads)",
        "",
        "Command: `python -m bench.refine_inputs --write docs/results/refine-inputs.md` (CPU, float32; start: "
        f"weighted + search on 32 x 512 tokens of pydoc-a, {args.steps} Adam steps per layer on 16 windows; "
        "perplexity on pydoc-b, 16 x 512).",
        "",
        f"Original model: **{original:.2f}**. Closed-form merge: **{merged:.2f}** "
        f"(calibration + merge {calib_merge:.1f} s).",
        "",
        "| inputs | perplexity | x original | vs merge | mean layer error before -> after | refine (s) |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for inputs, ppl, before, after, secs in rows:
        lines.append(
            f"| {inputs} | {ppl:.2f} | {ppl / original:.2f} | {100 * (ppl / merged - 1):+.0f}% "
            f"| {before:.4f} -> {after:.4f} | {secs:.1f} |"
        )
    lines.append("")
    lines.append(
        "Layer error: ||attn'(X) - Y||² / ||Y||² on the fitting inputs, averaged over layers (the sequential error "
        "includes the drift of the inputs, so it starts higher)."
    )
    report = "\n".join(lines) + "\n"
    print(report)
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(report)


if __name__ == "__main__":
    main()
