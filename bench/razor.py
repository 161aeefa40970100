"""RazorAttention benchmark: passkey retrieval, long-text perplexity and KV bytes, through stock models.

    PYTHONPATH=. python -m bench.razor --model smollm2 --profile PROFILE.json --contexts 2048,4096 --depths 0.2,0.8

Passkey prompts are read at once by default (`--prompt-chunk 0`, as `generate` does) and the key decoded through
the cache; `--question after` reads the document first and the question as a second prompt, once the cache has
been cut (the harder case: what the cache kept must answer a question it did not see). Perplexity reads
`--ppl-prompt` tokens at once and scores the rest as if decoded. Methods (same
prompt reading, same decode loop): full (every token), razor (profile's retrieval heads full,
others sink + window + compensation), windowed (StreamingLLM: every head sink + window, no compensation) and
random (as many retrieval heads as razor, chosen at random); `--masked` adds kvpress-style masking to the
perplexity (the same heads windowed by a mask over a full cache: razor's quality with every token reading its own
window, the full cache's memory). Each row is printed as a JSON line and all are written to `--json`; `--render`
prints the markdown tables of docs/results/razor.md from such files.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import time
from pathlib import Path

import torch

from kvconvert.compat import cache_kwargs
from kvconvert.evaluation.longcontext import ask_passkey, continuation_logits, nll, passkey_parts, ppl, random_key
from kvconvert.razor.tiers import parse_tiers, tiered_heads
from kvconvert.runtime.razor import policy_for, runtime_from_policy

QUESTION_MODES = {"prompt": ("prompt",), "after": ("after",), "both": ("prompt", "after")}


def methods(model, retrieval: list[list[int]], rule: dict, full_layers: list[int], seed: int = 0) -> dict:
    """name -> RazorRuntime, all at the same sink/window rule."""
    n_kv = model.config.num_key_value_heads
    layers = len(retrieval)
    rng = random.Random(seed)
    cells = [(i, h) for i in range(layers) for h in range(n_kv)]
    picked = set(rng.sample(cells, sum(map(len, retrieval))))
    rand = [[h for h in range(n_kv) if (i, h) in picked] for i in range(layers)]
    specs = {
        "full": ([list(range(n_kv))] * layers, rule),
        "razor": (retrieval, rule),
        "windowed": ([[]] * layers, rule | {"compensation": False}),
        "random": (rand, rule),
    }
    if full_layers:  # diagnostic: the profile plus every head of these layers
        plus = [list(range(n_kv)) if i in full_layers else r for i, r in enumerate(retrieval)]
        specs[f"razor+L{full_layers[0]}-{full_layers[-1]}"] = (plus, rule)
    return {name: runtime_from_policy(model, policy_for(model, r, **kw)) for name, (r, kw) in specs.items()}


def run(args) -> dict:
    from kvconvert.checkpoint import resolve
    from kvconvert.modeling import load_model, load_tokenizer
    from kvconvert.razor.store import load_profile

    ckpt = resolve(args.model)
    model, tok = load_model(ckpt, torch.device("cpu"), torch.float32), load_tokenizer(ckpt)
    profile = load_profile(args.profile)
    rule = {"sinks": args.sinks, "window_floor": args.window_floor, "window_fraction": args.window_fraction}
    if args.no_compensation:
        rule["compensation"] = False
    if args.compensation_bias:
        rule["compensation_bias"] = True
    rule["prompt_attention"] = args.prompt_attention
    retrieval = top(profile, args.top) if args.top else profile["retrieval"]
    if args.tiers:  # the next heads of the ranking get wider windows (per-head window fractions)
        n_kv, layers = model.config.num_key_value_heads, len(profile["retrieval"])
        full = args.top or sum(map(len, profile["retrieval"]))
        retrieval, fractions = tiered_heads(profile["ranking"], full, args.tiers, args.window_fraction, layers, n_kv)
        rule["head_fraction"] = fractions
    runtimes = methods(model, retrieval, rule, args.full_layers)
    if args.methods:
        runtimes = {k: v for k, v in runtimes.items() if k in args.methods}
    next(iter(runtimes.values())).attach(model)
    rng = random.Random(args.seed)
    for _ in range(args.skip_keys):  # a run split by context draws the keys the whole run would have drawn
        random_key(rng, args.digits)
    rows = []
    for ctx in args.contexts:
        for depth in args.depths:
            for _ in range(args.trials):
                key = random_key(rng, args.digits)
                text, question = passkey_parts(tok, ctx, depth, key)
                length = text.shape[1] + question.shape[1]
                for (name, rt), mode in itertools.product(runtimes.items(), QUESTION_MODES[args.question]):
                    t0 = time.process_time()
                    after = mode == "after"  # the document is cached (and cut) before the question arrives
                    out = ask_passkey(model, text, question, rt.new_cache(), args.prompt_chunk, args.digits + 1, after)
                    answer = tok.decode(out[0])
                    rows.append(
                        {
                            "task": "passkey",
                            "context": length,
                            "depth": depth,
                            "method": name,
                            "question": mode,
                            "key": key,
                            "correct": key in answer,
                            "answer": answer.strip(),
                            "cpu_s": time.process_time() - t0,
                            "kv_bytes": rt.kv_bytes(length),
                            "full_bytes": rt.policy.full_kv_bytes(length, 1, 4),
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
    if args.ppl_text:
        ids = tok(Path(args.ppl_text).read_text(), return_tensors="pt").input_ids[:, : args.ppl_tokens]
        for name, rt in runtimes.items():
            cache = rt.new_cache()
            t0 = time.process_time()
            total, count = nll(continuation_logits(model, ids, cache, args.chunk, args.ppl_prompt), ids, args.ppl_skip)
            prefill_cpu = time.process_time() - t0
            held = cache.storage_bytes()
            nxt, t0, w0 = ids[:, -1:], time.process_time(), time.perf_counter()
            with torch.no_grad():
                for _ in range(args.decode_tokens):
                    nxt = model(input_ids=nxt, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
            decode_cpu, decode_wall = time.process_time() - t0, time.perf_counter() - w0
            rows.append(
                {
                    "task": "perplexity",
                    "context": ids.shape[1],
                    "method": name,
                    "perplexity": ppl(total, count),
                    "kv_bytes": rt.kv_bytes(ids.shape[1]),
                    "measured_bytes": held,
                    "full_bytes": rt.policy.full_kv_bytes(ids.shape[1], 1, 4),
                    "prefill_cpu_s": prefill_cpu,
                    "decode_cpu_s_per_token": decode_cpu / args.decode_tokens,
                    "decode_wall_s_per_token": decode_wall / args.decode_tokens,
                    "bytes_after_decode": cache.storage_bytes(),
                    "computed_after_decode": rt.kv_bytes(ids.shape[1] + args.decode_tokens),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        if args.masked:
            rows.append(masked_row(model, ids, retrieval, rule, args.ppl_skip))
            print(json.dumps(rows[-1]), flush=True)
    res = {"model": args.model, "profile": args.profile, "rule": rule, "chunk": args.chunk, "rows": rows}
    res["prompt_chunk"] = args.prompt_chunk
    res |= {"tiers": args.tiers, "passkey_seed": args.seed, "ppl_prompt": args.ppl_prompt, "ppl_skip": args.ppl_skip}
    return res | {"retrieval_heads": sum(map(len, retrieval))}


def masked_row(model, ids: torch.Tensor, retrieval: list[list[int]], rule: dict, skip: int) -> dict:
    """kvpress-style baseline: the same heads windowed by a mask over a full cache (one pass, every token through
    its own window, no compensation token), so the quality of razor with `prompt_attention: window` and no
    compensation, and the memory of the full cache (a DynamicCache holds every key and value)."""
    from kvconvert.razor.ablation import masked_losses

    policy = policy_for(model, retrieval, **{k: rule[k] for k in ("sinks", "window_floor", "window_fraction")})
    windowed = torch.ones(policy.num_layers, policy.num_kv_heads, dtype=torch.bool)
    for layer, heads in enumerate(retrieval):
        windowed[layer, list(heads)] = False
    t0 = time.process_time()
    loss = masked_losses(model, ids, torch.arange(skip + 1, ids.shape[1]), [windowed], rule)[0]
    full = policy.full_kv_bytes(ids.shape[1], 1, 4)
    return {
        "task": "perplexity",
        "context": ids.shape[1],
        "method": "masked",
        "perplexity": math.exp(loss),
        "kv_bytes": full,
        "measured_bytes": full,  # by construction: the mask frees nothing
        "full_bytes": full,
        "prefill_cpu_s": time.process_time() - t0,
    }


def top(profile: dict, n: int) -> list[list[int]]:
    """The first `n` heads of an ablation profile's ranking, as per-layer retrieval lists."""
    if len(profile.get("ranking", ())) < n:
        raise SystemExit(f"--top {n}: the profile ranks only {len(profile.get('ranking', ()))} heads")
    retrieval = [[] for _ in profile["retrieval"]]
    for layer, head in profile["ranking"][:n]:
        retrieval[layer].append(head)
    return [sorted(r) for r in retrieval]


def _label(row: dict) -> str:
    """A passkey row's column: the method, marked when the question came after the cached document."""
    return row["method"] + (" (q after)" if row.get("question") == "after" else "")


def _span(text: str) -> list[int]:
    a, b = map(int, text.split("-"))
    return list(range(a, b + 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--profile", default="")
    ap.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",") if x], default=[2048, 4096])
    ap.add_argument("--depths", type=lambda s: [float(x) for x in s.split(",") if x], default=[0.2, 0.8])
    ap.add_argument("--trials", type=int, default=1)
    ap.add_argument("--digits", type=int, default=6)
    ap.add_argument("--chunk", type=int, default=512, help="Chunk length when scoring text (perplexity).")
    ap.add_argument(
        "--prompt-chunk", type=int, default=0, help="Passkey prompts read in chunks of N (0: at once, as generate)."
    )
    ap.add_argument(
        "--question",
        choices=sorted(QUESTION_MODES),
        default="both",
        help="Passkey question in the prompt (read with the document), after it (the document cached first), or both.",
    )
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--window-floor", type=int, default=256)
    ap.add_argument("--window-fraction", type=float, default=0.1)
    ap.add_argument("--ppl-text", default="")
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--ppl-skip", type=int, default=512)
    ap.add_argument(
        "--ppl-prompt",
        type=int,
        default=0,
        help="Read the text's first N tokens at once as a prompt, score the rest as decoded (use --ppl-skip N).",
    )
    ap.add_argument(
        "--prompt-attention",
        choices=["window", "full"],
        default="full",
        help="What a prompt chunk sees in windowed heads: its own windows, or all held (RazorAttention's order).",
    )
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--top", type=int, default=0, help="Retrieval heads: the first N of the profile's ranking.")
    ap.add_argument(
        "--tiers",
        type=parse_tiers,
        default=[],
        help="COUNT:FRACTION,...: the next heads of the ranking after --top get these window fractions.",
    )
    ap.add_argument("--no-compensation", action="store_true", help="Windowed heads keep no compensation token.")
    ap.add_argument(
        "--masked",
        action="store_true",
        help="Add the kvpress-style baseline to the perplexity: the same heads windowed by a mask, full cache kept.",
    )
    ap.add_argument(
        "--compensation-bias", action="store_true", help="Weigh the compensation token by log(tokens dropped)."
    )
    ap.add_argument("--seed", type=int, default=0, help="Passkey keys' random seed (0: the benchmark's keys).")
    ap.add_argument("--skip-keys", type=int, default=0, help="Draw and discard N keys first (e.g. 6 for 8k alone).")
    ap.add_argument("--full-layers", type=_span, default=[], help="e.g. 0-6: add razor + every head of these layers")
    ap.add_argument("--methods", type=lambda s: s.split(","), default=[])
    ap.add_argument(
        "--json", required=True, help="Write the raw rows here (with --render: read these, comma-separated)."
    )
    ap.add_argument("--render", action="store_true", help="Print markdown tables of existing --json files.")
    args = ap.parse_args()
    if args.render:
        print(render([json.loads(Path(p).read_text()) for p in args.json.split(",")]))
        return
    Path(args.json).write_text(json.dumps(run(args), indent=1))


def render(results: list[dict]) -> str:
    """Markdown tables of one or more `--json` outputs."""
    out = []
    for res in results:
        rows, rule = res["rows"], {k: v for k, v in res["rule"].items() if k != "head_fraction"}
        if res.get("tiers"):
            rule["tiers"] = ",".join(f"{n}:{f}" for n, f in res["tiers"])
        heads = f", {res['retrieval_heads']} retrieval heads" if "retrieval_heads" in res else ""
        out.append(f"### {res['model']} (profile `{Path(res['profile']).name}`{heads}, chunk {res['chunk']}, {rule})\n")
        pk = [r | {"method": _label(r)} for r in rows if r["task"] == "passkey"]
        if pk:
            names = list(dict.fromkeys(r["method"] for r in pk))
            out.append("| context | depth | " + " | ".join(names) + " |")
            out.append("|---|---|" + "---|" * len(names))
            for ctx, depth in dict.fromkeys((r["context"], r["depth"]) for r in pk):
                cells = []
                for n in names:
                    r = next((x for x in pk if (x["context"], x["depth"], x["method"]) == (ctx, depth, n)), None)
                    if r is None:
                        cells.append("–")
                        continue
                    cells.append(f"{'✓' if r['correct'] else '✗'} ({r['kv_bytes'] / r['full_bytes']:.2f}x KV)")
                out.append(f"| {ctx} | {depth} | " + " | ".join(cells) + " |")
            acc = {
                n: sum(r["correct"] for r in pk if r["method"] == n) / sum(r["method"] == n for r in pk) for n in names
            }
            out.append("| **accuracy** | | " + " | ".join(f"**{acc[n]:.0%}**" for n in names) + " |\n")
        pp = [r for r in rows if r["task"] == "perplexity"]
        if pp and res.get("ppl_prompt"):
            out.append(
                f"Perplexity: the first {res['ppl_prompt']} tokens read at once as a prompt, "
                "the rest scored as if decoded.\n"
            )
        if pp:
            full = next((r for r in pp if r["method"] == "full"), pp[0])
            out.append(
                "| method | tokens | perplexity | vs full | KV MiB held (computed) | KV vs full "
                "| decode CPU ms/token | held after decode = computed |"
            )
            out.append("|---|---|---|---|---|---|---|---|")
            for r in pp:
                out.append(
                    f"| {r['method']} | {r['context']} | {r['perplexity']:.3f} "
                    f"| {r['perplexity'] / full['perplexity']:.3f}x "
                    f"| {r['measured_bytes'] / 2**20:.1f} ({r['kv_bytes'] / 2**20:.1f}) "
                    f"| {r['full_bytes'] / max(r['kv_bytes'], 1):.2f}x less "
                    f"| {1000 * r.get('decode_cpu_s_per_token', float('nan')):.0f} "
                    f"| {r['bytes_after_decode'] == r['computed_after_decode'] if 'bytes_after_decode' in r else '–'} |"
                )
            out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
