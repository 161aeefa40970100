"""GPU part 3: decode speed and memory where the KV cache dominates, SmolLM2-135M shapes, 3 vs 1 KV heads.

Random bf16 weights (speed and memory do not depend on them). Each point fills a stock transformers `DynamicCache`
with `context` random tokens per sequence (what a prefill leaves), then times greedy decode steps of the stock
model (`model(input_ids, past_key_values=...)`, no attention mask, so transformers' SDPA path runs with
`enable_gqa` and never copies KV heads), on the fastest fused SDPA backend of a probe. Peak =
`torch.cuda.max_memory_allocated` over the decode steps (model + cache + the step's temporaries). The same point is
then decoded on a stock `StaticCache` with the step replayed as a CUDA graph (`graphed`, bench/static_decode.py):
eager steps there are bound by the host, graph replays by the GPU. The budget search finds, per model, the largest
batch at a fixed context whose decode steps run inside a fixed memory cap (`set_per_process_memory_fraction`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch

from bench.gpu_common import SMOKE, device, left, save, sync
from bench.razor_speed import cache_bytes
from kvconvert.compat import cache_kwargs

SHAPES = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9)
TINY = dict(vocab_size=512, hidden_size=72, intermediate_size=128, num_hidden_layers=2, num_attention_heads=9)
GRID_FULL = [(16, 4096), (16, 16384), (32, 32768), (64, 8192), (64, 16384), (128, 16384)]
GRID_TINY = [(2, 64), (4, 128)]


def build(kv_heads: int, dev: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    shapes = TINY if SMOKE else SHAPES
    config = LlamaConfig(
        **shapes, num_key_value_heads=kv_heads, head_dim=64, max_position_embeddings=65536, tie_word_embeddings=True
    )
    config._attn_implementation = "sdpa"
    with torch.device(dev):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def filled_cache(model, batch: int, context: int):
    from transformers import DynamicCache

    c = model.config
    cache = DynamicCache(config=c)
    p = next(model.parameters())
    shape = (batch, c.num_key_value_heads, context, c.head_dim)
    for layer in range(c.num_hidden_layers):
        k = torch.randn(shape, device=p.device, dtype=p.dtype)
        v = torch.randn(shape, device=p.device, dtype=p.dtype)
        cache.update(k, v, layer)
        del k, v
    return cache


@torch.no_grad()
def decode(model, batch: int, context: int, steps: int, warmup: int = 2) -> dict:
    """Tokens/s of `steps` greedy decode steps after `warmup` ones, and the peak memory over all of them."""
    dev = next(model.parameters()).device
    cache = filled_cache(model, batch, context)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    tok = torch.randint(0, model.config.vocab_size, (batch, 1), device=dev)
    pos = torch.full((batch, 1), context, device=dev, dtype=torch.long)
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        out = model(input_ids=tok, **cache_kwargs(cache), position_ids=pos, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        pos = pos + 1
    sync()
    seconds = time.perf_counter() - t0
    held = cache_bytes(cache)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else model_bytes + held
    del cache, out
    return {
        "batch": batch,
        "context": context,
        "steps": steps,
        "decode_tokens_per_s": batch * steps / seconds,
        "step_ms": 1000 * seconds / steps,
        "cache_bytes": held,
        "peak_bytes": peak,
        "peak_kind": "cuda_max_memory_allocated" if dev.type == "cuda" else "model + cache bytes (CPU)",
    }


@torch.no_grad()
def graphed(model, batch: int, context: int, steps: int, warmup: int = 2) -> dict:
    """Decode on a `StaticCache` (bench/static_decode.py): the step eagerly (`warmup` steps: host-bound), then
    captured as a CUDA graph and replayed `steps` times (GPU-bound). On CPU only the eager steps are timed."""
    from bench.static_decode import StaticDecoder

    dev = next(model.parameters()).device
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    dec = StaticDecoder(model, batch, context, warmup + steps + 2)
    sync()
    t0 = time.perf_counter()
    for _ in range(warmup):
        dec.step()
    sync()
    r = {"batch": batch, "context": context, "eager_step_ms": 1000 * (time.perf_counter() - t0) / warmup}
    if cuda:
        dec.graph(warmup=1)  # one more eager step on a side stream, then the capture (which runs nothing)
        dec.replay()
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            dec.replay()
        sync()
        seconds = time.perf_counter() - t0
        r |= {"graph_step_ms": 1000 * seconds / steps, "graph_tokens_per_s": batch * steps / seconds}
    r |= {"cache_bytes": cache_bytes(dec.cache), "peak_bytes": torch.cuda.max_memory_allocated(dev) if cuda else None}
    del dec
    return r


BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")
"""Fused SDPA kernels; the math fallback would copy KV heads. On the first H200 run (torch 2.11, all three allowed)
every decode step took ~65 ms whatever the cache size; one suspect is cuDNN, which can build a graph for each new
key length, i.e. every decode step. So the backend is now chosen by timing each one at a probe point."""


def attention_backend(dev: torch.device, dtype: torch.dtype) -> tuple[Callable, str, dict]:
    """(context factory, name, probe step ms per backend): the fastest fused SDPA backend for 1-KV-head decode."""
    if dev.type != "cuda":
        return contextlib.nullcontext, "CPU", {}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = build(1, dev, dtype)
    batch, context = (2, 64) if SMOKE else (16, 4096)
    probe: dict = {}
    for name in (*BACKENDS, "torch's choice"):
        ctx = contextlib.nullcontext() if name not in BACKENDS else sdpa_kernel([getattr(SDPBackend, name)])
        try:
            with ctx:
                probe[name] = round(decode(model, batch, context, steps=3, warmup=2)["step_ms"], 3)
        except RuntimeError as exc:
            probe[name] = "failed: " + str(exc).splitlines()[0][:160]
        torch.cuda.empty_cache()
    del model
    timed = {n: t for n, t in probe.items() if n in BACKENDS and isinstance(t, float)}
    if not timed:
        return contextlib.nullcontext, "torch's choice (no fused backend ran)", probe
    best = min(timed, key=timed.__getitem__)
    return (lambda: sdpa_kernel([getattr(SDPBackend, best)])), best, probe


def fits(model, batch: int, context: int, budget: int) -> bool:
    """Whether two decode steps at (batch, context) run inside `budget` bytes."""
    try:
        r = decode(model, batch, context, steps=1, warmup=1)
        ok = r["peak_bytes"] <= budget
    except torch.OutOfMemoryError:
        ok = False
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return ok


def largest_batch(model, context: int, budget: int, limit: int = 8192) -> int:
    """Largest batch (to within 1/16) whose decode fits `budget` at `context`: doubling, then bisection."""
    lo, hi = 0, 1
    while hi <= limit and fits(model, hi, context, budget):
        lo, hi = hi, hi * 2
    while hi - lo > max(1, lo // 16):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(model, mid, context, budget) else (lo, mid)
    return lo


def measure_point(model, attention: Callable, batch: int, context: int) -> tuple[dict, dict]:
    """(eager `DynamicCache` decode, static cache + CUDA graph decode) of one grid point; OOM and capture failures
    are recorded, not raised."""
    try:
        with attention():
            eager = decode(model, batch, context, steps=4 if SMOKE else 10)
    except torch.OutOfMemoryError:
        eager = {"batch": batch, "context": context, "oom": True}
        torch.cuda.empty_cache()
    try:  # the same point on a static cache, the step replayed as a CUDA graph (torch's SDPA choice)
        graph = graphed(model, batch, context, steps=4 if SMOKE else 20)
    except (RuntimeError, torch.OutOfMemoryError) as exc:
        graph = {"batch": batch, "context": context, "error": str(exc).splitlines()[0][:300]}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return eager, graph


def main() -> None:
    dev = device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    grid = GRID_TINY if SMOKE else GRID_FULL
    budget_context = 256 if SMOKE else 8192
    budget = (2 * 2**20) if SMOKE else 40 * 2**30
    total = torch.cuda.get_device_properties(0).total_memory if dev.type == "cuda" else None
    result: dict = {"shapes": TINY if SMOKE else SHAPES, "dtype": str(dtype), "budget": {}}
    result |= {"points": {"3": [], "1": []}, "graphed": {"3": [], "1": []}}
    t_end = time.time() + left(150)
    attention, name, probe = attention_backend(dev, dtype)
    result["sdpa"] = f"{name} (fastest 1-KV decode step at the probe point; ms per step: {probe})" if probe else name
    result["sdpa_probe_ms"] = probe
    print("sdpa:", result["sdpa"], flush=True)
    models = {kv: build(kv, dev, dtype) for kv in (3, 1)}
    # Both models at each point, the largest point first: a run cut short by its time share still has pairs, and
    # the point the decode target is judged at.
    for batch, context in sorted(grid, key=lambda point: -point[0] * point[1]):
        if time.time() > t_end - 20:
            print("runtime: out of time, skipping the rest of the grid", flush=True)
            break
        for kv, model in models.items():
            eager, graph = measure_point(model, attention, batch, context)
            print(f"kv={kv} {eager}\nkv={kv} static+graph {graph}", flush=True)
            result["points"][str(kv)].append(eager)
            result["graphed"][str(kv)].append(graph)
        save("runtime", result)
    for kv, model in models.items():
        if time.time() > t_end - 10:
            print("runtime: out of time for the memory-budget search", flush=True)
            break
        if total is not None:
            torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total))
        with attention():
            b = largest_batch(model, budget_context, budget, limit=64 if SMOKE else 8192)
        if total is not None:
            torch.cuda.set_per_process_memory_fraction(1.0)
        result["budget"][str(kv)] = {"budget_bytes": budget, "context": budget_context, "largest_batch": b}
        print(f"kv={kv} largest batch at {budget_context} tokens in {budget / 2**30:.1f} GiB: {b}", flush=True)
        save("runtime", result)


if __name__ == "__main__":
    main()
