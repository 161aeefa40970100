"""Held-out perplexity vs healing tokens for SmolLM2-135M-Instruct 3 -> 1 KV heads, from mean, svd, weighted and
refined (weighted + `--refine-steps 30`) merges.

Calibrates on pydoc-a (32 x 512 tokens), merges with each method, then heals each start by KL distillation from the
original on the same training windows (pydoc-a, then text sampled from the original to fill the budget) and scores
perplexity on pydoc-b (held out, 16 x 512 tokens) along the way. Prints a table; with --write, writes
docs/results/NAME.md, NAME.json and NAME.png (NAME = --name, default heal).

    python -m bench.heal --tokens 100000 --write
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from bench.corpora import DEFAULT_DIR, pydoc_split
from kvconvert.checkpoint import resolve
from kvconvert.evaluation.perplexity import perplexity
from kvconvert.heal import HealRequest, run_heal
from kvconvert.heal.checkpointing import save_windows
from kvconvert.heal.data import build_windows
from kvconvert.modeling import load_model, load_tokenizer
from kvconvert.pipeline import CalibrationRequest, CompressRequest, RefineRequest, run_calibration, run_compress
from kvconvert.stats import CalibrationStats
from kvconvert.textdata import iter_texts, token_windows, windows_digest

CACHE = Path(".bench-cache/heal")
REFINED = RefineRequest(steps=30, lr=0.02, samples=16, inputs="sequential")
"""The `refined` start: the weighted merge, then 30 layer-local steps per layer (`compress --refine-steps 30`)."""
CPU = torch.device("cpu")


def starts(methods: list[str], cache: Path, pydoc_a: Path) -> dict[str, Path]:
    """Merged 1-KV-head checkpoints, one per method, from one calibration on pydoc-a (cached)."""
    stats_path = cache / "stats.safetensors"
    if not stats_path.exists():
        cal = CalibrationRequest(dataset=str(pydoc_a), samples=32, seq_len=512, batch_size=8, device="cpu")
        run_calibration(resolve("smollm2"), cal, stats_path)
    CalibrationStats.load(stats_path)
    out = {}
    for name in methods:
        out[name] = cache / f"start-{name}"
        if not (out[name] / "kvconvert.json").exists():
            method, refine = (name, RefineRequest()) if name != "refined" else ("weighted", REFINED)
            req = CompressRequest("smollm2", "1", out[name], method=method, stats=stats_path, overwrite=True)
            req.refine = refine
            run_compress(req)
    return out


def training_windows(args, cache: Path, pydoc_a: Path) -> Path:
    """One set of training windows shared by every run (cached by its recipe)."""
    n = -(-args.tokens // (args.batch_size * args.seq_len)) * args.batch_size
    path = cache / f"windows-{'+'.join(Path(d).stem for d in args.data)}-{n}x{args.seq_len}-s{args.seed}.safetensors"
    if not path.exists():
        teacher = load_model(resolve("smollm2"), CPU, torch.float32)
        data = [str(pydoc_a) if d == "pydoc-a" else d for d in args.data]
        tokenizer = load_tokenizer(resolve("smollm2"))
        windows, sources = build_windows(teacher, tokenizer, data, n, args.seq_len, seed=args.seed)
        save_windows(cache, windows, sources)
        (cache / "windows.safetensors").rename(path)
    return path


def heal_curve(start: Path, train: str, windows: Path, eval_windows: torch.Tensor, args, cache: Path) -> dict:
    """Perplexity at each of args.eval_at tokens (0 = the merged start) along one healing run."""
    points = sorted(set(args.eval_at) | {0})
    curve = {0: perplexity(load_model(resolve(str(start)), CPU, torch.float32), eval_windows, 4)}
    print(f"  {start.name} {train}: 0 tokens -> {curve[0]:.2f}", flush=True)
    pending = [p for p in points if p > 0]

    def on_step(info, model) -> None:
        while pending and info.tokens >= pending[0]:
            model.eval()
            curve[pending.pop(0)] = ppl = perplexity(model, eval_windows, 4)
            model.train()
            print(f"  {start.name} {train}: {info.tokens} tokens (loss {info.loss:.4f}) -> {ppl:.2f}", flush=True)

    t0 = time.perf_counter()
    req = HealRequest(
        student=str(start),
        teacher="smollm2",
        output=cache / f"healed-{args.name}-{start.name.removeprefix('start-')}-{train}",
        datasets=[str(windows)],
        tokens=args.tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        lr=args.lr,
        train=train,
        device="cpu",
        checkpoint_every=10**9,
        overwrite=True,
        verify=False,
    )
    run_heal(req, on_step=on_step)
    return {"curve": curve, "seconds": time.perf_counter() - t0}


def previous_rows(args) -> list[dict]:
    """Rows of an earlier NAME.json for (start, train) pairs this run does not redo (curve keys back to ints)."""
    path = args.write / f"{args.name}.json"
    if not path.exists():
        return []
    redo = {(s, t) for s in args.starts for t in args.train}
    rows = json.loads(path.read_text())["rows"]
    kept = [r for r in rows if (r["start"], r["train"]) not in redo]
    return [r | {"curve": {int(k): v for k, v in r["curve"].items()}} for r in kept]


def write_results(rows: list[dict], original: float, args, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    points = sorted({p for r in rows for p in r["curve"]})
    commands = sorted({r["command"] for r in rows})
    lines = [
        "# Healing SmolLM2-135M-Instruct 3 → 1 KV heads",
        "",
        "Command"
        + ("s" if len(commands) > 1 else "")
        + ": "
        + ", ".join(f"`{c}`" for c in commands)
        + " (CPU, float32, single process; `s` is the wall time of each run, see its note).",
        "",
        f"Training windows: {' + '.join(args.data)}; {args.batch_size} x {args.seq_len} tokens per step, "
        f"lr {args.lr} (AdamW, 5% warm-up, cosine to 0 over {args.tokens} tokens), KL(teacher ‖ student), T = 1. "
        "Perplexity on pydoc-b (held out), 16 x 512 tokens; every point of a row is from one run with the "
        f"{args.tokens}-token schedule. Original model: **{original:.2f}**.",
        "",
        "| start | train | "
        + " | ".join(f"{p // 1000}k" if p else "merged" for p in points)
        + " | × original | s | note |",
        "|---|---|" + "---|" * len(points) + "---|---|---|",
    ]
    for r in rows:
        cells = " | ".join(f"{r['curve'][p]:.2f}" if p in r["curve"] else "" for p in points)
        last = r["curve"][max(r["curve"])]
        lines.append(
            f"| {r['start']} | {r['train']} | {cells} | {last / original:.2f} | {r['seconds']:.0f} | {r['note']} |"
        )
    lines.append("")
    (out / f"{args.name}.md").write_text("\n".join(lines))
    record = {"original": original, "rows": rows}
    (out / f"{args.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        xs = sorted(r["curve"])
        ax.plot(xs, [r["curve"][x] for x in xs], marker="o", label=f"{r['start']} / {r['train']}")
    ax.axhline(original, color="k", ls="--", lw=1, label="original")
    ax.axhline(2.5 * original, color="grey", ls=":", lw=1, label="2.5 × original")
    ax.set(yscale="log", xlabel="healing tokens", ylabel="perplexity on pydoc-b", title="SmolLM2 3 → 1 KV heads")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{args.name}.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--starts", nargs="+", default=["mean", "svd", "weighted", "refined"])
    parser.add_argument("--train", nargs="+", default=["attn"], help="attn, all and/or lora")
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--eval-at", type=int, nargs="+", default=[25_000, 50_000, 100_000])
    parser.add_argument("--data", nargs="+", default=["pydoc-a", "self"], help="pydoc-a, self, or paths")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--write", type=Path, nargs="?", const=Path("docs/results"), default=None)
    parser.add_argument("--name", default="heal", help="file stem of the written results")
    parser.add_argument("--note", default="quiet machine", help="recorded with each row (e.g. what else ran)")
    parser.add_argument(
        "--append", action="store_true", help="keep the rows already in NAME.json that this run does not redo"
    )
    args = parser.parse_args()
    command = "python -m bench.heal " + shlex.join(sys.argv[1:])

    torch.manual_seed(0)
    args.cache.mkdir(parents=True, exist_ok=True)
    pydoc_a, pydoc_b = pydoc_split(DEFAULT_DIR)
    tokenizer = load_tokenizer(resolve("smollm2"))
    eval_windows = token_windows(tokenizer, iter_texts(str(pydoc_b)), 16, 512, "pydoc-b")
    original = perplexity(load_model(resolve("smollm2"), CPU, torch.float32), eval_windows, 4)
    print(f"original: {original:.2f} (pydoc-b {windows_digest(eval_windows)[:12]})", flush=True)
    windows = training_windows(args, args.cache, pydoc_a)
    rows = previous_rows(args) if args.append and args.write else []
    for method, path in starts(args.starts, args.cache, pydoc_a).items():
        for train in args.train:
            result = heal_curve(path, train, windows, eval_windows, args, args.cache)
            rows.append({"start": method, "train": train, **result, "command": command, "note": args.note})
            if args.write:  # after every run, so a stopped benchmark keeps what it measured
                write_results(rows, original, args, args.write)
    print(f"\n{'start':<10}{'train':<7}" + "".join(f"{p:>10}" for p in sorted(rows[0]["curve"])))
    for r in rows:
        print(f"{r['start']:<10}{r['train']:<7}" + "".join(f"{r['curve'][p]:>10.2f}" for p in sorted(r["curve"])))


if __name__ == "__main__":
    main()
