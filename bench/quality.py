"""Quality benchmark on the real SmolLM2-135M-Instruct (9 query / 3 KV heads): held-out perplexity of every merge.

Grid: methods {mean, svd, weighted} x grouping {adjacent, search} x targets {3->1 KV heads on the model itself;
9->3 and 9->1 on its MHA expansion (each query head its own copy of its KV head, head order shuffled)}; a
calibration-size sweep (8/32/120 windows of 512 tokens); and the layer-local refinement (`--refine-steps 30`) on
top of `weighted`. Calibration text: pydoc-a; evaluation text: pydoc-b (different documents, bench/corpora.py).

    python -m bench.quality --write docs/results
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
from kvconvert.expand import expand_to_mha
from kvconvert.modeling import load_model, load_tokenizer
from kvconvert.pipeline import CalibrationRequest, plan_compression, request_windows, run_calibration
from kvconvert.refine import RefineOptions, refine
from kvconvert.textdata import iter_texts, token_windows
from kvconvert.verify import converted_in_memory

CPU = torch.device("cpu")
METHODS = ("mean", "svd", "weighted")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path(".bench-cache/quality"))
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--sweep", default="8,32,120")
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--refine-steps", type=int, default=30)
    ap.add_argument("--write", type=Path, help="directory for quality.md and quality.png")
    args = ap.parse_args()
    t_start = time.perf_counter()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    text_a, text_b = pydoc_split()
    base = resolve("smollm2")
    mha_dir = work / "smollm2-mha-shuffled"
    if not (mha_dir / "config.json").exists():
        expand_to_mha(base, mha_dir, seed=0)
    mha = resolve(str(mha_dir))
    held_out = token_windows(load_tokenizer(base), iter_texts(str(text_b)), args.eval_samples, args.seq_len, "b")
    original = perplexity(load_model(base, CPU, torch.float32), held_out, 4)
    print(f"original: {original:.2f}", flush=True)

    def calibrate(ckpt, samples: int):
        req = CalibrationRequest(dataset=str(text_a), samples=samples, seq_len=args.seq_len, batch_size=8, device="cpu")
        t0 = time.perf_counter()
        windows = request_windows(ckpt, req)
        stats = run_calibration(ckpt, req, work / f"{ckpt.path.name}-{samples}.safetensors", windows=windows)
        return stats, windows, time.perf_counter() - t0

    def score(conv) -> float:
        return perplexity(converted_in_memory(conv), held_out, 4)

    rows, timings = [], {}
    stats = {}
    for name, ckpt in (("base", base), ("mha", mha)):
        stats[name], windows, secs = calibrate(ckpt, args.calib_samples)
        timings[f"calibrate {name} ({args.calib_samples}x{args.seq_len})"] = secs
        if name == "base":
            base_windows = windows
    targets = [
        ("3 -> 1", "base", base, 1),
        ("9 -> 3 (MHA-expanded)", "mha", mha, 3),
        ("9 -> 1 (MHA-expanded)", "mha", mha, 1),
    ]
    for label, key, ckpt, n in targets:
        for method in METHODS:
            for grouping in ("adjacent", "search"):
                t0 = time.perf_counter()
                plan = plan_compression(ckpt, stats[key], n, method, grouping, CPU)
                secs = time.perf_counter() - t0
                ppl = score(Converted(ckpt, plan))
                rows.append((label, method, grouping, ppl, secs))
                print(f"{label:24s} {method:9s} {grouping:9s} {ppl:12.2f}  decompose {secs:.1f}s", flush=True)

    sweep = []
    for samples in [int(s) for s in args.sweep.split(",")]:
        st = stats["base"] if samples == args.calib_samples else calibrate(base, samples)[0]
        for method in METHODS:
            ppl = score(Converted(base, plan_compression(base, st, 1, method, "search", CPU)))
            sweep.append((samples, method, ppl))
            print(f"sweep {samples:4d} {method:9s} {ppl:12.2f}", flush=True)

    refined = []
    if args.refine_steps:
        opts = RefineOptions(steps=args.refine_steps)
        for label, key, ckpt, n in (targets[0], targets[2]):
            plan = plan_compression(ckpt, stats[key], n, "weighted", "search", CPU)
            windows = base_windows[:16]
            t0 = time.perf_counter()
            conv, _ = refine(Converted(ckpt, plan), windows, opts, work / f"refined-{key}-{n}", CPU)
            secs = time.perf_counter() - t0
            refined.append((label, score(conv), secs))
            print(f"refined {label:24s} {refined[-1][1]:12.2f}  refine {secs:.1f}s", flush=True)

    total = time.perf_counter() - t_start
    report = render(args, original, rows, sweep, refined, timings, total)
    print(report)
    if args.write:
        args.write.mkdir(parents=True, exist_ok=True)
        (args.write / "quality.md").write_text(report)
        plot(rows, refined, original, args.write / "quality.png")


def render(args, original, rows, sweep, refined, timings, total) -> str:
    lines = [
        "# Quality benchmark: SmolLM2-135M-Instruct",
        "",
        "Command: `python -m bench.quality --write docs/results` "
        f"(calibration: {args.calib_samples} x {args.seq_len} tokens of pydoc-a; held-out perplexity: "
        f"{args.eval_samples} x {args.seq_len} tokens of pydoc-b; float32, CPU). Total run time {total / 60:.1f} min.",
        "",
        f"Original model (9 query / 3 KV heads; its MHA expansion is the same function): perplexity "
        f"**{original:.2f}**.",
        "",
        "| target | method | grouping | perplexity | x original | decompose (s) |",
        "|---|---|---|---:|---:|---:|",
    ]
    for label, method, grouping, ppl, secs in rows:
        lines.append(f"| {label} | {method} | {grouping} | {ppl:.2f} | {ppl / original:.2f} | {secs:.1f} |")
    lines += [
        "",
        "## Calibration size (3 -> 1, grouping search)",
        "",
        "| windows of 512 | " + " | ".join(METHODS) + " |",
        "|---:|" + "---:|" * len(METHODS),
    ]
    for samples in sorted({s for s, _, _ in sweep}):
        vals = {m: p for s, m, p in sweep if s == samples}
        lines.append(f"| {samples} | " + " | ".join(f"{vals[m]:.2f}" for m in METHODS) + " |")
    if refined:
        lines += [
            "",
            f"## Layer-local refinement (weighted + search, then `--refine-steps {args.refine_steps}`, "
            "16 windows, sequential inputs)",
            "",
            "| target | perplexity | x original | refine (s) |",
            "|---|---:|---:|---:|",
        ]
        for label, ppl, secs in refined:
            lines.append(f"| {label} | {ppl:.2f} | {ppl / original:.2f} | {secs:.1f} |")
    lines += ["", "Calibration times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()), ""]
    return "\n".join(lines)


def plot(rows, refined, original, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    heads = {"9 -> 3 (MHA-expanded)": 3, "9 -> 1 (MHA-expanded)": 1}
    for method in METHODS:
        pts = sorted(
            ((heads[t], p) for t, m, g, p, _ in rows if m == method and g == "search" and t in heads), reverse=True
        )
        xs, ys = [9, *(h for h, _ in pts)], [original, *(p for _, p in pts)]
        ax.plot(xs, ys, marker="o", label=f"{method} (search)")
    refined_mha = [p for label, p, _ in refined if label in heads]
    if refined_mha:
        ax.plot([9, 1], [original, refined_mha[0]], marker="s", linestyle="--", label="weighted + refine")
    ax.set_xscale("log", base=3)
    ax.set_yscale("log")
    ax.set_xticks([1, 3, 9], ["1", "3", "9"])
    ax.invert_xaxis()
    ax.set_xlabel("KV heads (MHA-expanded SmolLM2-135M, 9 query heads)")
    ax.set_ylabel("held-out perplexity (pydoc-b)")
    ax.axhline(original, color="gray", linewidth=0.8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
