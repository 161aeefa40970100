"""`kvconvert eval --cache KIND[:ARG]`: perplexity, passkey retrieval, KV bytes and decode speed through a cache
runtime (kvconvert.runtime), against the full DynamicCache on the same tokens. Passkey prompts are read at once,
as `generate` reads them, and the key's digits are decoded through the cache; `passkey_after` reads the document
first and the question as a second prompt after the cache was cut (what a chat's next turn or a reused prefix
cache sees). Perplexity: with
`prompt_fraction`, each window's first part is read at once as a prompt and the rest scored as if decoded;
without, the window is read in `chunk`s and every position scored."""

from __future__ import annotations

import random
import time

import torch

from kvconvert.compat import cache_kwargs
from kvconvert.evaluation.longcontext import (
    ask_passkey,
    continuation_logits,
    nll,
    passkey_parts,
    ppl,
    prefill,
    random_key,
)
from kvconvert.evaluation.runtime import synchronize
from kvconvert.progress import Progress, Silent

DEPTHS = (0.2, 0.5, 0.8)
"""Where the passkey sits in each passkey prompt (fraction of the context)."""


def _dynamic(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@torch.no_grad()
def evaluate_cache(
    model,
    tokenizer,
    spec: str,
    windows: torch.Tensor,
    contexts: list[int],
    chunk: int = 512,
    new_tokens: int = 32,
    prompt_fraction: float = 0.0,
    progress: Progress | None = None,
) -> dict:
    """Full cache vs `spec` on `windows` (perplexity) and at each context (passkey at 3 depths, decode tok/s),
    one progress bar per cache (a step per window, per passkey prompt and per decode run)."""
    from kvconvert.runtime import runtime_for

    progress = progress or Silent()
    original = model.config._attn_implementation
    runtime = runtime_for(spec, model)
    caches = {"full": lambda: _dynamic(model), spec: lambda: runtime.new_cache(model, 1)}
    prompt = int(prompt_fraction * windows.shape[1])
    report: dict = {"cache": spec, "chunk": chunk, "prompt_tokens": prompt, "methods": {}}
    for name, new_cache in caches.items():
        # the full-cache baseline runs the model's own attention (a runtime's function may cut even without its cache)
        if name == "full":
            model.set_attn_implementation(original)
        else:
            runtime.attach(model)
        step = progress.task(f"eval {name}", len(windows) + (2 * len(DEPTHS) + 1) * len(contexts))
        total = count = 0
        for row in windows:
            t, c = nll(continuation_logits(model, row[None], new_cache(), chunk, prompt), row[None], prompt)
            total, count = total + t, count + c
            step(info="perplexity")
        entry = {"perplexity": ppl(total, count), "contexts": {}}
        for ctx in contexts:
            hits, hits_after = [], []
            for depth in DEPTHS:
                key = random_key(random.Random(ctx + int(depth * 100)), 6)
                text, question = passkey_parts(tokenizer, ctx, depth, key)
                for after, found in ((False, hits), (True, hits_after)):  # the question in the prompt, after the cut
                    answer = ask_passkey(model, text, question, new_cache(), 0, 7, after)
                    found.append(key in tokenizer.decode(answer[0]))
                    step(info=f"passkey at {ctx} tokens")
            ids = torch.randint(0, model.config.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(0))
            ids = ids.to(next(model.parameters()).device)
            cache = new_cache()
            prefill(model, ids, cache, chunk)
            nxt = ids[:, -1:]
            synchronize(ids.device)  # CUDA runs asynchronously: time the decode steps, not their launches
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                nxt = model(input_ids=nxt, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
            synchronize(ids.device)
            seconds = time.perf_counter() - t0
            step(info=f"decode at {ctx} tokens")
            held = _held_bytes(cache)
            entry["contexts"][str(ctx)] = {
                "passkey_accuracy": sum(hits) / len(hits),
                "passkey_after_accuracy": sum(hits_after) / len(hits_after),
                "decode_tokens_per_second": new_tokens / seconds,
                "cache_bytes": held,
                "computed_bytes": runtime.kv_bytes(ctx + new_tokens) if name == spec else None,
            }
        report["methods"][name] = entry
    return report


def _held_bytes(cache) -> int:
    """Bytes the cache holds: its own count where a runtime cache keeps its tensors elsewhere, else K and V."""
    from kvconvert.evaluation.kvcache import cache_bytes

    for own in ("storage_bytes", "nbytes"):
        if hasattr(cache, own):
            return getattr(cache, own)()
    return cache_bytes(cache)
