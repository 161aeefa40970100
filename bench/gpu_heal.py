"""GPU part 4: held-out perplexity of SmolLM2-135M-Instruct 3 -> 1 KV heads against healing tokens and seconds.

Start: the refined merge (`compress --heads 1 --refine-steps 30`, calibrated on pydoc-a). Healing: KL distillation
from the original, all weights trained (`--train all`), on pydoc-a followed by the Python standard library's own
source code (local text, generated at run time), repeated in new orders when it runs out. Held-out: pydoc-b.
The token budget is set from the time this part has left; a run that would overrun stops at its last point.
Both models are scored the same way (bf16 autocast on the GPU, float32 on CPU).
"""

from __future__ import annotations

import contextlib
import math
import time

import torch

from bench.corpora import pydoc_split
from bench.gpu_common import SMOKE, SMOL, WORK, device, left, save, stdlib_text
from kvconvert.checkpoint import resolve
from kvconvert.evaluation.perplexity import perplexity
from kvconvert.heal import HealRequest, run_heal
from kvconvert.modeling import load_model, load_tokenizer
from kvconvert.pipeline import CalibrationRequest, CompressRequest, RefineRequest, run_compress
from kvconvert.textdata import iter_texts, token_windows

TOKENS_PER_S_GUESS = 80_000
"""Planning guess of healing throughput on one H100/H200 (bf16, batch 16 x 1024); the run measures the real one."""


class OutOfTime(Exception):
    pass


def autocast(dev: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()


def main() -> None:
    dev = device()
    work = WORK / "heal"
    a, b = pydoc_split(WORK / "text")
    seq, batch = (64, 4) if SMOKE else (1024, 16)
    t0 = time.perf_counter()
    start = work / "start-refined"
    cal = CalibrationRequest(str(a), 8 if SMOKE else 32, seq, 8, device="auto")
    req = CompressRequest(SMOL, "1", start, method="weighted", overwrite=True, calibration=cal, verify=False)
    req.refine = RefineRequest(steps=30, lr=0.02, samples=4 if SMOKE else 16, inputs="sequential")
    run_compress(req)
    merge_seconds = time.perf_counter() - t0

    tokenizer = load_tokenizer(resolve(SMOL))
    held_out = token_windows(tokenizer, iter_texts(str(b)), 4 if SMOKE else 32, seq, str(b))
    teacher = load_model(resolve(SMOL), dev, torch.float32)
    with autocast(dev):
        original = perplexity(teacher, held_out, 8)
    del teacher
    student0 = load_model(resolve(str(start)), dev, torch.float32)
    with autocast(dev):
        merged = perplexity(student0, held_out, 8)
    del student0
    print(f"original {original:.2f}, refined merge {merged:.2f}", flush=True)

    budget = left(200) - 40  # leave time for loading, window building and the last evaluation
    tokens = 4 * batch * seq if SMOKE else int(min(20e6, max(1e6, budget * TOKENS_PER_S_GUESS)))
    data = stdlib_text(work / "train.txt", 200_000 if SMOKE else 12_000_000)
    points = sorted({round(tokens * f) for f in (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)})
    curve = [{"tokens": 0, "seconds": 0.0, "perplexity": merged}]
    pending = list(points)
    t_train = [None]
    eval_spent = [0.0]
    deadline = time.time() + budget

    def on_step(info, model) -> None:
        if t_train[0] is None:
            t_train[0] = time.perf_counter() - info.tokens / max(info.tokens_per_s, 1e-9)
        if (pending and info.tokens >= pending[0]) or time.time() > deadline:
            while pending and info.tokens >= pending[0]:
                pending.pop(0)
            t_eval = time.perf_counter()
            model.eval()
            with autocast(dev):
                ppl = perplexity(model, held_out, 8)
            model.train()
            seconds = t_eval - t_train[0] - eval_spent[0]  # training time only
            eval_spent[0] += time.perf_counter() - t_eval
            curve.append({"tokens": info.tokens, "seconds": round(seconds, 1), "perplexity": ppl, "loss": info.loss})
            print(f"heal: {info.tokens} tokens, {seconds:.0f} s, loss {info.loss:.4f} -> ppl {ppl:.2f}", flush=True)
            save("heal", result())
            if time.time() > deadline:
                raise OutOfTime

    def result() -> dict:
        return {
            "original_perplexity": original,
            "refined_merge_perplexity": merged,
            "merge_seconds": round(merge_seconds, 1),
            "planned_tokens": tokens,
            "batch": batch,
            "seq_len": seq,
            "train": "all",
            "held_out": f"pydoc-b, {len(held_out)} x {seq} tokens",
            "curve": curve,
            "ratio_at_end": curve[-1]["perplexity"] / original,
        }

    heal = HealRequest(
        student=str(start),
        teacher=SMOL,
        output=work / "healed",
        datasets=[str(data)],
        tokens=tokens,
        seq_len=seq,
        batch_size=batch,
        lr=3e-4,
        train="all",
        device="auto",
        checkpoint_every=10**9,
        overwrite=True,
        verify=False,
    )
    try:
        run_heal(heal, on_step=on_step)
    except OutOfTime:
        print("heal: stopped at the time budget", flush=True)
    out = result()
    out["stopped_early"] = bool(pending)
    out["within_1_3x"] = [p["tokens"] for p in curve if p["perplexity"] <= 1.3 * original][:1]
    if not math.isfinite(out["ratio_at_end"]):
        out["ratio_at_end"] = None
    save("heal", out)


if __name__ == "__main__":
    main()
