"""GPU part: RazorAttention's cache against the stock `DynamicCache`, decode speed and peak memory at long contexts.

SmolLM2-135M shapes with random bf16 weights (speed and memory do not depend on them), 3 KV heads; the razor policy
keeps 19 of the 90 KV heads whole (the count `kvconvert profile smollm2` selects, chosen at random here: the cost
does not depend on which) and the others a window (the runtime's default rule). Each point prefills `context` random
tokens in chunks through the model and cache (what generate() does with a long prompt), then times greedy decode
steps; peak = `torch.cuda.max_memory_allocated` over prefill and decode.
"""

from __future__ import annotations

import time

import torch

from bench.gpu_common import SMOKE, device, left, save, sync
from bench.gpu_runtime import build
from bench.razor_speed import cache_bytes
from kvconvert.compat import cache_kwargs

POINTS_FULL = [(16, 8192), (16, 32768), (64, 16384)]
POINTS_TINY = [(2, 640)]
RETRIEVAL_HEADS = 19


def razor_runtime(model, seed: int = 0):
    from kvconvert.runtime.razor import policy_for, runtime_from_policy

    c = model.config
    g = torch.Generator().manual_seed(seed)
    heads = [(layer, h) for layer in range(c.num_hidden_layers) for h in range(c.num_key_value_heads)]
    n = min(len(heads), RETRIEVAL_HEADS if not SMOKE else 2)
    chosen = [heads[int(i)] for i in torch.randperm(len(heads), generator=g)[:n]]
    retrieval = [[h for lay, h in chosen if lay == layer] for layer in range(c.num_hidden_layers)]
    return runtime_from_policy(model, policy_for(model, retrieval))


@torch.no_grad()
def run_point(model, kind: str, batch: int, context: int, steps: int, chunk: int) -> dict:
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    if kind == "razor":
        rt = razor_runtime(model)
        rt.attach(model)
        cache = rt.new_cache(model, batch)
    else:
        model.set_attn_implementation("sdpa")
        cache = DynamicCache(config=model.config)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=dev)
    sync()
    t0 = time.perf_counter()
    for i in range(0, context, chunk):
        logits = model(input_ids=ids[:, i : i + chunk], **cache_kwargs(cache), logits_to_keep=1).logits
    sync()
    prefill = time.perf_counter() - t0
    tok = logits[:, -1:].argmax(-1)
    for i in range(steps + 2):
        if i == 2:
            sync()
            t0 = time.perf_counter()
        tok = model(input_ids=tok, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
    sync()
    seconds = time.perf_counter() - t0
    held = cache_bytes(cache)
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    del cache, ids
    return {
        "kind": kind,
        "batch": batch,
        "context": context,
        "prefill_seconds": round(prefill, 3),
        "decode_tokens_per_s": batch * steps / seconds,
        "step_ms": 1000 * seconds / steps,
        "cache_bytes": held,
        "peak_bytes": peak,
    }


def main() -> None:
    dev = device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = build(3, dev, dtype)
    t_end = time.time() + left(120)
    rows = []
    for batch, context in POINTS_TINY if SMOKE else POINTS_FULL:
        for kind in ("dynamic", "razor"):
            if time.time() > t_end - 15:
                print("razor: out of time", flush=True)
                break
            try:
                r = run_point(model, kind, batch, context, steps=4 if SMOKE else 10, chunk=128 if SMOKE else 2048)
            except (RuntimeError, torch.OutOfMemoryError) as exc:
                r = {"kind": kind, "batch": batch, "context": context, "error": str(exc).splitlines()[0][:300]}
            print(f"razor part: {r}", flush=True)
            rows.append(r)
            save("razor", {"retrieval_heads": RETRIEVAL_HEADS, "of_heads": 90, "points": rows})


if __name__ == "__main__":
    main()
