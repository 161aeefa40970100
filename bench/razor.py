"""RazorAttention benchmark: passkey retrieval, long-text perplexity and KV bytes, through stock models.

    PYTHONPATH=. python -m bench.razor --model smollm2 --profile PROFILE.json --contexts 2048,4096 --depths 0.2,0.8

Methods (same chunked prefill, same decode loop): full (every token), razor (profile's retrieval heads full,
others sink + window + compensation), windowed (StreamingLLM: every head sink + window, no compensation) and
random (as many retrieval heads as razor, chosen at random). Prints a table and writes docs/results/razor.md.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from kvconvert.evaluation.longcontext import greedy, nll, passkey_prompt, ppl, prefill, random_key
from kvconvert.runtime.razor import policy_for, runtime_from_policy


def methods(model, retrieval: list[list[int]], rule: dict, seed: int = 0) -> dict:
    """name -> RazorRuntime, all at the same sink/window rule."""
    n_kv = len(retrieval[0]) if False else model.config.num_key_value_heads
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
    return {name: runtime_from_policy(model, policy_for(model, r, **kw)) for name, (r, kw) in specs.items()}


def run(args) -> dict:
    from kvconvert.checkpoint import resolve
    from kvconvert.modeling import load_model, load_tokenizer
    from kvconvert.razor.store import load_profile

    ckpt = resolve(args.model)
    model, tok = load_model(ckpt, torch.device("cpu"), torch.float32), load_tokenizer(ckpt)
    profile = load_profile(args.profile)
    rule = {"sinks": args.sinks, "window_floor": args.window_floor, "window_fraction": args.window_fraction}
    runtimes = methods(model, profile["retrieval"], rule)
    next(iter(runtimes.values())).attach(model)
    rng = random.Random(0)
    rows = []
    for ctx in args.contexts:
        for depth in args.depths:
            for _ in range(args.trials):
                key = random_key(rng, args.digits)
                ids = passkey_prompt(tok, ctx, depth, key)
                for name, rt in runtimes.items():
                    t0 = time.process_time()
                    answer = tok.decode(greedy(model, ids, rt.new_cache(), args.chunk, args.digits + 1)[0])
                    rows.append(
                        {
                            "task": "passkey",
                            "context": ids.shape[1],
                            "depth": depth,
                            "method": name,
                            "correct": key in answer,
                            "answer": answer.strip(),
                            "cpu_s": time.process_time() - t0,
                            "kv_bytes": rt.kv_bytes(ids.shape[1]),
                            "full_bytes": rt.policy.full_kv_bytes(ids.shape[1], 1, 4),
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
    if args.ppl_text:
        ids = tok(Path(args.ppl_text).read_text(), return_tensors="pt").input_ids[:, : args.ppl_tokens]
        for name, rt in runtimes.items():
            cache = rt.new_cache()
            total, count = nll(prefill(model, ids, cache, args.chunk), ids, args.ppl_skip)
            rows.append(
                {
                    "task": "perplexity",
                    "context": ids.shape[1],
                    "method": name,
                    "perplexity": ppl(total, count),
                    "kv_bytes": rt.kv_bytes(ids.shape[1]),
                    "measured_bytes": cache.storage_bytes(),
                    "full_bytes": rt.policy.full_kv_bytes(ids.shape[1], 1, 4),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return {"model": args.model, "profile": args.profile, "rule": rule, "chunk": args.chunk, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--profile", required=True)
    ap.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 4096])
    ap.add_argument("--depths", type=lambda s: [float(x) for x in s.split(",")], default=[0.2, 0.8])
    ap.add_argument("--trials", type=int, default=1)
    ap.add_argument("--digits", type=int, default=6)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--window-floor", type=int, default=256)
    ap.add_argument("--window-fraction", type=float, default=0.1)
    ap.add_argument("--ppl-text", default="")
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--ppl-skip", type=int, default=512)
    ap.add_argument("--json", required=True, help="Write the raw rows here.")
    args = ap.parse_args()
    Path(args.json).write_text(json.dumps(run(args), indent=1))


if __name__ == "__main__":
    main()
