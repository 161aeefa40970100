"""Families benchmark on real models: Gemma 3 270M (QK-norm, sliding windows) and Qwen2.5-Coder-0.5B-Instruct.

1. Gemma 3 270M (4 query / 1 KV head): expanded to 4 KV heads with the heads shuffled, compressed back to 1.
2. Gemma 3 270M, QK-norm beyond duplicates: the 4 expanded KV copies each get independent noise (10 % of the
   weights' RMS on k_proj and v_proj), then compressed back to 1 with the QK-norm merge (`normalised`, the
   default), the method's maps folded as for Llama (`linear`), plain averaging of the pre-norm projections
   (`mean` + `linear`), and `normalised` + layer-local refinement.
3. Qwen2.5-Coder-0.5B-Instruct (14 query / 2 KV heads) 2 -> 1 with mean, svd, weighted, weighted + refinement.

Calibration text: pydoc-a; held-out perplexity: pydoc-b (bench/corpora.py). The GGUF files come from PyPI packages
(see docs/families.md); pass their paths.

    python -m bench.families --gemma /tmp/gemma3-270m.gguf --qwen /tmp/qwen-coder-0.5b.gguf --write docs/results
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bench.corpora import pydoc_split
from kvconvert.checkpoint import Checkpoint, resolve
from kvconvert.converted import Converted
from kvconvert.decompose import decompose
from kvconvert.evaluation.perplexity import perplexity
from kvconvert.expand import expand
from kvconvert.merge.rope import pair_coherence
from kvconvert.modeling import load_model, load_tokenizer
from kvconvert.pipeline import ROPE_HORIZON, CalibrationRequest, rope_theta, run_calibration
from kvconvert.refine import RefineOptions, refine
from kvconvert.textdata import iter_texts, token_windows
from kvconvert.verify import converted_in_memory

CPU = torch.device("cpu")


class Bench:
    def __init__(self, args):
        self.args, self.work = args, args.workdir
        self.work.mkdir(parents=True, exist_ok=True)
        self.text_a, self.text_b = pydoc_split()
        self.rows: list[tuple[str, str, float, float]] = []

    def windows(self, ckpt: Checkpoint, text: Path, n: int) -> torch.Tensor:
        return token_windows(load_tokenizer(ckpt), iter_texts(str(text)), n, self.args.seq_len, text.name)

    def stats(self, ckpt: Checkpoint, name: str):
        req = CalibrationRequest(str(self.text_a), self.args.calib_samples, self.args.seq_len, 4, device="cpu")
        return run_calibration(ckpt, req, self.work / f"{name}.safetensors")

    def plan(self, ckpt: Checkpoint, stats, n: int, method: str, qk_norm: str = "normalised"):
        geom = ckpt.family.geometry(ckpt.config)
        coherence = pair_coherence(rope_theta(ckpt.config), geom.rotary_dim, ROPE_HORIZON)
        return decompose(stats.moments, ckpt.attention, geom, n, method, "search", coherence, qk_norm=qk_norm)

    def score(self, model_name: str, label: str, model, held_out, secs: float) -> float:
        ppl = perplexity(model, held_out, 4)
        self.rows.append((model_name, label, ppl, secs))
        print(f"{model_name:10s} {label:52s} {ppl:10.3f}  ({secs:.0f} s)", flush=True)
        return ppl

    def converted(self, model_name, label, ckpt, stats, n, method, held_out, qk_norm="normalised", refine_n=0):
        t0 = time.perf_counter()
        conv = Converted(ckpt, self.plan(ckpt, stats, n, method, qk_norm))
        if refine_n:
            windows = self.windows(ckpt, self.text_a, refine_n)
            opts = RefineOptions(steps=self.args.refine_steps, batch_size=4)
            conv, _ = refine(conv, windows, opts, self.work / f"refine-{model_name}-{method}-{qk_norm}", CPU)
        return self.score(model_name, label, converted_in_memory(conv), held_out, time.perf_counter() - t0)


def noisy_copy(src: Path, dst: Path, family, geom, level: float, seed: int) -> Path:
    """`src` with independent noise (level x the tensor's RMS) on every k_proj/v_proj weight (each KV copy its own)."""
    if (dst / "config.json").exists():
        return dst
    import shutil

    shutil.copytree(src, dst)
    gen = torch.Generator().manual_seed(seed)
    for f in dst.glob("*.safetensors"):
        tensors = load_file(str(f))
        for layer in range(geom.num_layers):
            for proj in ("k", "v"):
                name = family.tensor_name(layer, proj)
                if name in tensors:
                    t = tensors[name]
                    rms = t.pow(2).mean().sqrt()
                    tensors[name] = t + level * rms * torch.randn(t.shape, generator=gen, dtype=t.dtype)
        save_file(tensors, str(f), metadata={"format": "pt"})
    return dst


def gemma(b: Bench, path: str) -> None:
    base = resolve(path)
    geom = base.family.geometry(base.config)
    held_out = b.windows(base, b.text_b, b.args.eval_samples)
    t0 = time.perf_counter()
    b.score("gemma3", "original (4 q / 1 KV)", load_model(base, CPU, torch.float32), held_out, time.perf_counter() - t0)
    shuffled_dir = b.work / "gemma3-kv4-shuffled"
    if not (shuffled_dir / "config.json").exists():
        expand(base, shuffled_dir, n_new=geom.num_heads, seed=0)
    shuffled = Checkpoint(shuffled_dir, "gemma3-kv4")
    stats = b.stats(shuffled, "gemma3-kv4")
    b.converted("gemma3", "4 shuffled copies -> 1, weighted", shuffled, stats, 1, "weighted", held_out)
    noisy = Checkpoint(noisy_copy(shuffled_dir, b.work / "gemma3-kv4-noisy", base.family, geom, 0.1, 0), "noisy")
    t0 = time.perf_counter()
    b.score("gemma3", "4 noisy copies (reference, 4 KV)", load_model(noisy, CPU, torch.float32), held_out, 0.0)
    nstats = b.stats(noisy, "gemma3-kv4-noisy")
    b.converted(
        "gemma3", "noisy 4 -> 1: mean + linear (pre-norm average)", noisy, nstats, 1, "mean", held_out, "linear"
    )
    b.converted(
        "gemma3", "noisy 4 -> 1: weighted + linear (Llama-style maps)", noisy, nstats, 1, "weighted", held_out, "linear"
    )
    b.converted("gemma3", "noisy 4 -> 1: weighted + normalised (QK-norm merge)", noisy, nstats, 1, "weighted", held_out)
    label = "noisy 4 -> 1: mean + normalised (QK-norm key merge, averaged values)"
    b.converted("gemma3", label, noisy, nstats, 1, "mean", held_out)
    if b.args.refine_steps:
        b.converted(
            "gemma3",
            "noisy 4 -> 1: normalised + refinement",
            noisy,
            nstats,
            1,
            "weighted",
            held_out,
            refine_n=b.args.refine_samples,
        )


def qwen(b: Bench, path: str) -> None:
    base = resolve(path)
    held_out = b.windows(base, b.text_b, b.args.eval_samples)
    t0 = time.perf_counter()
    b.score(
        "qwen2.5", "original (14 q / 2 KV)", load_model(base, CPU, torch.float32), held_out, time.perf_counter() - t0
    )
    stats = b.stats(base, "qwen-coder")
    for method in ("mean", "svd", "weighted"):
        b.converted("qwen2.5", f"2 -> 1: {method}", base, stats, 1, method, held_out)
    if b.args.refine_steps:
        b.converted(
            "qwen2.5",
            "2 -> 1: weighted + refinement",
            base,
            stats,
            1,
            "weighted",
            held_out,
            refine_n=b.args.refine_samples,
        )


def render(b: Bench, total: float) -> str:
    a = b.args
    lines = [
        "# Families benchmark: Gemma 3 270M and Qwen2.5-Coder-0.5B-Instruct",
        "",
        f"Command: `python -m bench.families --gemma GEMMA.gguf --qwen QWEN.gguf --seq-len {a.seq_len} "
        f"--calib-samples {a.calib_samples} --eval-samples {a.eval_samples} --refine-steps {a.refine_steps} "
        f"--refine-samples {a.refine_samples} "
        "--write docs/results` (GGUF files assembled from the PyPI packages, see docs/families.md). Calibration: "
        f"{a.calib_samples} x {a.seq_len} tokens of pydoc-a; held-out perplexity: {a.eval_samples} x {a.seq_len} "
        f"tokens of pydoc-b; float32 on CPU, one thread. Total {total / 60:.1f} min, measured while other jobs "
        "shared the 2 cores (wall times are contended).",
        "",
        "| model | conversion | held-out perplexity | x original | time (s) |",
        "|---|---|---:|---:|---:|",
    ]
    originals = {m: p for m, label, p, _ in b.rows if label.startswith("original")}
    for model, label, ppl, secs in b.rows:
        lines.append(f"| {model} | {label} | {ppl:.3f} | {ppl / originals[model]:.4f} | {secs:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gemma", help="Gemma 3 270M GGUF")
    ap.add_argument("--qwen", help="Qwen2.5-Coder-0.5B-Instruct GGUF")
    ap.add_argument("--workdir", type=Path, default=Path(".bench-cache/families"))
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--refine-steps", type=int, default=20)
    ap.add_argument("--refine-samples", type=int, default=8)
    ap.add_argument("--write", type=Path)
    args = ap.parse_args()
    t0 = time.perf_counter()
    b = Bench(args)
    if args.gemma:
        gemma(b, args.gemma)
    if args.qwen:
        qwen(b, args.qwen)
    report = render(b, time.perf_counter() - t0)
    print(report)
    if args.write:
        args.write.mkdir(parents=True, exist_ok=True)
        name = "families.md" if args.gemma and args.qwen else f"families-{'gemma3' if args.gemma else 'qwen'}.md"
        (args.write / name).write_text(report)


if __name__ == "__main__":
    main()
