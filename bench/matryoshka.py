"""MatryoshkaKV on a real model: held-out perplexity at several cache budgets for PCA-only/uniform, trained/uniform
and trained/searched rates, the cache the runtime really keeps, and the combination with a KV-head merge.

    python -m bench.matryoshka --model smollm2 --train-text T.txt --eval-text E.txt [--merged DIR] --json R.json

Text files are split into documents at blank lines and read directly (no `datasets`). Writes a markdown table to
--out (default docs/results/matryoshka.md) and everything measured to --json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from kvconvert.compat import cache_kwargs
from kvconvert.evaluation.perplexity import perplexity
from kvconvert.heal.data import text_windows
from kvconvert.matryoshka.moments import collect_kv_moments
from kvconvert.matryoshka.projections import (
    Projections,
    load_projections,
    orthogonality_error,
    pca_bases,
    save_projections,
    uniform_rate,
)
from kvconvert.matryoshka.search import refine_rates
from kvconvert.matryoshka.train import TrainConfig, train_projections
from kvconvert.runtime.matryoshka import MatryoshkaRuntime
from kvconvert.runtime.matryoshka_attention import attention_modules

BUDGETS = (0.75, 0.5, 0.375, 0.25)


def docs(path: Path) -> list[str]:
    return [d for d in path.read_text().split("\n\n") if d.strip()]


def load(spec: str, device: torch.device):
    from kvconvert.checkpoint import resolve
    from kvconvert.modeling import load_model, load_tokenizer

    ckpt = resolve(spec)
    return load_model(ckpt, device, torch.float32), load_tokenizer(ckpt)


def detach(model) -> None:
    for m in attention_modules(model):
        if hasattr(m, "matryoshka"):
            m.matryoshka.enabled = False


def ppl(model, proj: Projections | None, windows: torch.Tensor, batch: int) -> float:
    if proj is None:
        detach(model)
    else:
        MatryoshkaRuntime(proj).attach(model)
    return perplexity(model, windows, batch_size=batch)


def uniform(proj: Projections, budget: float, step: int) -> Projections:
    layers, n_kv, head_dim = proj.shape
    r = torch.full((layers, n_kv), uniform_rate(head_dim, budget, step), dtype=torch.long)
    return proj.with_rates(r, r.clone())


def train(model, pca: Projections, train_w: torch.Tensor, args) -> tuple[Projections, dict]:
    """Matryoshka training from the PCA bases; the trained projections and what it cost (wall and process CPU)."""
    cfg = TrainConfig(steps=args.steps, batch_size=args.train_batch, lr=args.lr, seed=0)
    cpu0 = time.process_time()
    res = train_projections(model, pca, train_w, cfg, max(1, pca.shape[2] // 8))
    trained = res.projections
    return trained, {
        "steps": cfg.steps,
        "batch": cfg.batch_size,
        "seq_len": train_w.shape[1],
        "tokens": res.tokens,
        "seconds": res.seconds,
        "cpu_seconds": time.process_time() - cpu0,
        "threads": torch.get_num_threads(),
        "lr": cfg.lr,
        "loss_first10": sum(res.losses[:10]) / 10,
        "loss_last10": sum(res.losses[-10:]) / 10,
        "orthogonality_error": max(orthogonality_error(trained.key_basis), orthogonality_error(trained.value_basis)),
    }


def matryoshka_suite(model, train_w, heldout_w, eval_w, args, budgets, label: str) -> dict:
    """PCA bases, training, one sensitivity table; perplexities per budget for the three variants."""
    out: dict = {"label": label}
    t0 = time.perf_counter()
    moments = collect_kv_moments(model, train_w, batch_size=args.batch)
    key_m, value_m = moments.mean()
    head_dim = key_m.shape[-1]
    step = max(1, head_dim // 8)
    pca = Projections(pca_bases(key_m), pca_bases(value_m), *([torch.full(key_m.shape[:2], head_dim)] * 2))
    out["moments_tokens"], out["moments_s"] = moments.tokens, time.perf_counter() - t0
    saved = args.projections / f"{label}.safetensors" if args.projections else None
    if saved is not None and saved.is_file():  # trained by an earlier run with the same settings
        trained, out["train"] = load_projections(saved)
        trained = trained.with_rates(pca.key_rates, pca.value_rates)
    else:
        trained, out["train"] = train(model, pca, train_w, args)
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            save_projections(saved, trained, out["train"])
    if args.train_only:
        return out
    rows, out["searched"] = {}, {}
    for b in budgets:
        found, row = search(model, trained, heldout_w, b, step, args)
        out["searched"][b] = searched = found.projections
        row |= {
            "pca_uniform": ppl(model, uniform(pca, b, step), eval_w, args.batch),
            "trained_uniform": ppl(model, uniform(trained, b, step), eval_w, args.batch),
            "trained_searched": ppl(model, searched, eval_w, args.batch),
            "uniform_fraction": uniform(pca, b, step).fraction(),
        }
        rows[str(b)] = row
        print(label, b, {k: v for k, v in row.items() if "rates" not in k}, flush=True)
    out["budgets"] = rows
    out["trained"] = trained
    return out


def search(model, trained: Projections, heldout_w: torch.Tensor, budget: float, step: int, args) -> tuple:
    """The rate search at one budget: its result and a report row (timed, wall and process CPU)."""
    t, cpu = time.perf_counter(), time.process_time()
    found = refine_rates(model, trained, heldout_w, budget, step, args.search_evals, objective=args.search_objective)
    row = {
        "search_s": time.perf_counter() - t,
        "search_cpu_s": time.process_time() - cpu,
        "search_tried": found.tried,
        "search_moves": found.moves,
        "search_start_kl": found.uniform_kl,
        "search_kl": found.kl,
        "searched_fraction": found.projections.fraction(),
        "searched_key_rates": found.projections.key_rates.tolist(),
        "searched_value_rates": found.projections.value_rates.tolist(),
    }
    return found, row


@torch.no_grad()
def cache_check(model, proj: Projections, tokens: int) -> dict:
    """Generate with the MatryoshkaCache; its tensor bytes vs the computed size and vs a DynamicCache."""
    rt = MatryoshkaRuntime(proj)
    rt.attach(model)
    rt.dtype_bytes = next(model.parameters()).element_size()
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, tokens // 2), generator=torch.Generator().manual_seed(0))
    cache = rt.new_cache(model, 1)
    model.generate(ids.to(device), **cache_kwargs(cache), max_new_tokens=tokens - tokens // 2, do_sample=False)
    seen = cache.get_seq_length()
    detach(model)
    dyn = model(ids.to(device), use_cache=True).past_key_values
    full = sum(la.keys.numel() * la.keys.element_size() * 2 for la in dyn.layers) // ids.shape[1] * seen
    return {"tokens": seen, "measured": cache.nbytes(), "computed": rt.kv_bytes(seen, 1), "full": full}


def render(r: dict) -> str:
    """The results page (markdown) from a report."""
    m, o = r["matryoshka"], r["original_ppl"]
    t = m["train"]
    objective = {"kl": "KL to the original", "ce": "next-token CE"}.get(r.get("search_objective", "kl"))
    short = "CE" if r.get("search_objective") == "ce" else "KL"
    lines = [
        "# MatryoshkaKV results",
        "",
        "Measured by " + " and ".join(f"`{c}`" for c in r["commands"]) + f" on {r['device']} (float32); "
        f"{r['total_s']:.0f} s wall"
        + (" summed over the parts (run side by side)" if len(r["commands"]) > 1 else "")
        + (f", {r['total_cpu_s']:.0f} s process CPU." if "total_cpu_s" in r else "."),
        f"Model {r['model']}. Held-out perplexity on {r['eval_windows']} x {r['seq_len']} tokens "
        f"({r['eval_tokens']} tokens) of text never used for calibration. Original: **{o:.3f}**.",
        f"PCA from post-RoPE key / value moments of {m['moments_tokens']} tokens; training {t['steps']} steps x "
        f"{t['batch']} windows x {t['seq_len']} tokens = {t['tokens']} tokens in {t['seconds']:.0f} s wall"
        + (f", {t['cpu_seconds']:.0f} s process CPU ({t['threads']} thread)" if "cpu_seconds" in t else "")
        + f" (lr {t['lr']}, loss {t['loss_first10']:.4f} -> {t['loss_last10']:.4f}, "
        f"max |PtP - I| {t['orthogonality_error']:.1e}); rate search on {r['heldout_windows']} held-out calibration "
        f"windows (moves from the uniform cut, each kept only if a real forward lowers the {objective} there).",
        "",
        "| KV cache budget | PCA, uniform | trained, uniform | trained + searched | searched share kept "
        f"| search: moves kept / tried, {short} start -> end, CPU s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for b, row in m["budgets"].items():
        cells = [
            f"{row[k]:.3f} ({row[k] / o - 1:+.1%})" for k in ("pca_uniform", "trained_uniform", "trained_searched")
        ]
        found = (
            f"{len(row['search_moves'])} / {row['search_tried']}, {row['search_start_kl']:.4f} -> "
            f"{row['search_kl']:.4f}, {row['search_cpu_s']:.0f}"
        )
        lines.append(f"| {float(b):.1%} | " + " | ".join(cells) + f" | {row['searched_fraction']:.1%} | {found} |")
    c = r["cache"]
    lines += [
        "",
        f"Cache after `generate()` of {c['tokens']} tokens at the searched 50 % rates: {c['measured']} bytes measured "
        f"tensor by tensor, {c['computed']} computed, {c['full']} for the stock DynamicCache "
        f"({c['measured'] / c['full']:.1%}).",
    ]
    if "combination" in r:
        k = r["combination"]
        mm = k["merged_matryoshka"]["budgets"]["0.5"]
        lines += [
            "",
            "## Combination with the KV-head merge",
            "",
            "| method | KV cache kept | perplexity |",
            "| --- | --- | --- |",
            f"| head merge alone | {k['kv_share']:.1%} | {k['merged_ppl']:.3f} |",
            f"| MatryoshkaKV alone (trained + searched) | {k['matryoshka_at_merge_share']['fraction']:.1%} | "
            f"{k['matryoshka_at_merge_share']['ppl']:.3f} |",
            f"| head merge + MatryoshkaKV 50 % (trained, uniform) | {k['kv_share'] * mm['uniform_fraction']:.1%} | "
            f"{mm['trained_uniform']:.3f} |",
            f"| head merge + MatryoshkaKV 50 % (trained + searched) | {k['kv_share'] * mm['searched_fraction']:.1%} | "
            f"{mm['trained_searched']:.3f} |",
            f"| MatryoshkaKV alone (trained + searched) | {k['matryoshka_at_combined_share']['fraction']:.1%} | "
            f"{k['matryoshka_at_combined_share']['ppl']:.3f} |",
            "",
            f"MatryoshkaKV on the merged model: trained like the original ({k['merged_matryoshka']['train']['tokens']} "
            f"tokens, {k['merged_matryoshka']['train']['seconds']:.0f} s wall"
            + (
                f", {k['merged_matryoshka']['train']['cpu_seconds']:.0f} s process CPU)."
                if "cpu_seconds" in k["merged_matryoshka"]["train"]
                else ")."
            ),
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--merged", default=None, help="The same model merged to fewer KV heads (kvconvert compress).")
    ap.add_argument("--train-text", type=Path, required=True)
    ap.add_argument("--eval-text", type=Path, required=True)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--heldout", type=int, default=8)
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--search-evals", type=int, default=16, help="Held-out forwards per rate search.")
    ap.add_argument("--search-objective", choices=("kl", "ce"), default="ce", help="What the rate search lowers.")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU).")
    ap.add_argument("--projections", type=Path, default=None, help="Save trained bases here; reuse them if present.")
    ap.add_argument("--train-only", action="store_true", help="Stop after training (with --projections).")
    ap.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS), help="Budgets of the main table.")
    ap.add_argument("--combination", choices=("all", "merged", "alone"), default="all", help="Which rows (--merged).")
    ap.add_argument("--no-main", action="store_true", help="Only the combination (bases from --projections).")
    ap.add_argument("--reports", type=Path, nargs="+", help="Render these --json reports (parts of one run) only.")
    ap.add_argument("--out", type=Path, default=Path("docs/results/matryoshka.md"))
    args = ap.parse_args()
    if args.reports:  # e.g. a main-table run and a --no-main combination run, side by side on a 2-core machine
        report = {}
        for path in args.reports:
            part = json.loads(path.read_text())
            if "matryoshka" in report and "matryoshka" in part:  # two halves of the budgets
                part["matryoshka"]["budgets"] = report["matryoshka"]["budgets"] | part["matryoshka"]["budgets"]
            if "combination" in report and "combination" in part:  # its merged and alone halves
                part["combination"] = report["combination"] | part["combination"]
            report |= part | {"commands": report.get("commands", []) + part["commands"]}
        report["total_s"] = sum(json.loads(p.read_text())["total_s"] for p in args.reports)
        report["total_cpu_s"] = sum(json.loads(p.read_text())["total_cpu_s"] for p in args.reports)
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
        args.out.write_text(render(report))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    t_start = time.perf_counter()
    model, tok = load(args.model, device)
    calib = text_windows(tok, docs(args.train_text), args.seq_len, args.samples + args.heldout)
    train_w, heldout_w = calib[: args.samples], calib[args.samples :].to(device)
    eval_w = text_windows(tok, docs(args.eval_text), args.seq_len, args.eval_samples)
    n_kv = model.config.num_key_value_heads
    report: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "model": args.model,
        "seq_len": args.seq_len,
        "train_windows": len(train_w),
        "heldout_windows": len(heldout_w),
        "search_objective": args.search_objective,
        "eval_windows": len(eval_w),
        "eval_tokens": int(eval_w.numel()),
        "original_ppl": ppl(model, None, eval_w, args.batch) if not args.train_only else None,
    }
    print("original", report["original_ppl"], flush=True)
    if args.train_only:  # only the trained bases (saved under --projections); the tables come from a later run
        for label, spec in (("original", args.model), ("merged", args.merged)):
            if spec:
                m = model if label == "original" else load(spec, device)[0]
                print(label, matryoshka_suite(m, train_w, heldout_w, eval_w, args, (), label)["train"], flush=True)
        return
    report["commands"] = ["python -m bench.matryoshka " + " ".join(sys.argv[1:])]
    if args.no_main:
        trained = load_projections(args.projections / "original.safetensors")[0]
    else:
        main_suite = matryoshka_suite(model, train_w, heldout_w, eval_w, args, args.budgets, "original")
        trained, searched = main_suite.pop("trained"), main_suite.pop("searched")
        report["matryoshka"] = main_suite
        if 0.5 in searched:
            report["cache"] = cache_check(model, searched[0.5], 64)
    if args.merged:
        merged, _ = load(args.merged, device)
        share = merged.config.num_key_value_heads / n_kv
        combo: dict = {"kv_share": share}
        if args.combination in ("all", "merged"):
            combo["merged_ppl"] = ppl(merged, None, eval_w, args.batch)
            combo["merged_matryoshka"] = matryoshka_suite(merged, train_w, heldout_w, eval_w, args, (0.5,), "merged")
            combo["merged_matryoshka"].pop("trained"), combo["merged_matryoshka"].pop("searched")
        step = max(1, trained.shape[2] // 8)
        alone = (("matryoshka_at_merge_share", share), ("matryoshka_at_combined_share", share * 0.5))
        for name, b in alone if args.combination in ("all", "alone") else ():
            found, row = search(model, trained, heldout_w, b, step, args)
            combo[name] = row | {
                "budget": b,
                "fraction": found.projections.fraction(),
                "ppl": ppl(model, found.projections, eval_w, args.batch),
            }
        report["combination"] = combo
    report["total_s"] = time.perf_counter() - t_start
    report["total_cpu_s"] = time.process_time()
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if not args.no_main and "cache" in report:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render(report))
    print(json.dumps({k: v for k, v in report.items() if k != "matryoshka"}, indent=1)[:3000])


if __name__ == "__main__":
    main()
