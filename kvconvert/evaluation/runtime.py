"""Decode throughput, peak memory and the real KV cache of stock `generate()` at a context length.

Each measurement runs in a child process (`python -m kvconvert.evaluation.runtime`), so on CPU the peak resident
memory it reports (`ru_maxrss`) is that of importing torch, loading the model and generating, and nothing else. The
same figure taken after loading and generating 2 tokens from a 1-token prompt (every weight touched, no real cache)
is reported as the model's own memory, so what a long `generate()` adds is their difference. On CUDA both are the
allocator's peak (`torch.cuda.max_memory_allocated`).

Timing: one warm-up `generate()`, then the median of `repeats` runs. A no-op logits processor stamps the time of
every step of one ordinary `generate()` call: the first stamp comes right after the prefill, so prefill time is
(first stamp - call start) and decode speed is batch x (new_tokens - 1) / (last stamp - first stamp).
The KV cache that call returns is measured tensor by tensor and compared with the size computed from the config.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from kvconvert.evaluation.kvcache import cache_bytes, kv_cache_bytes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory(device: torch.device) -> tuple[int, str]:
    """Peak memory so far: CUDA allocator peak, or this process's max resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_max_rss"


class StepClock:
    """A logits processor that changes nothing and records when each generation step's logits are ready."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        return scores


@torch.no_grad()
def probe(model_path: str, context: int, new_tokens: int, repeats: int, device: str, dtype: str, batch: int) -> dict:
    """Measure in this process (see module doc); returns a JSON-ready dict."""
    from transformers import LogitsProcessorList

    from kvconvert.checkpoint import resolve
    from kvconvert.modeling import load_model, resolve_device, resolve_dtype

    if new_tokens < 2:
        raise ValueError("new_tokens must be at least 2 (decode speed is timed between steps)")
    dev = resolve_device(device)
    model = load_model(resolve(model_path), dev, resolve_dtype(dtype, dev))
    pad = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    one = torch.zeros((1, 1), dtype=torch.long, device=dev)
    model.generate(one, attention_mask=torch.ones_like(one), max_new_tokens=2, do_sample=False, pad_token_id=pad)
    model_memory, kind = _memory(dev)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=gen).to(dev)
    mask = torch.ones_like(ids)

    def run() -> tuple[float, float, int]:
        clock = StepClock(dev)
        _sync(dev)
        t0 = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
            logits_processor=LogitsProcessorList([clock]),
            return_dict_in_generate=True,
        )
        if len(clock.stamps) != new_tokens:
            raise RuntimeError(f"generate() ran {len(clock.stamps)} steps, {new_tokens} asked for")
        size = cache_bytes(out.past_key_values)
        return clock.stamps[0] - t0, clock.stamps[-1] - clock.stamps[0], size

    run()  # warm-up
    runs = [run() for _ in range(repeats)]
    peak, _ = _memory(dev)
    prefill = statistics.median(r[0] for r in runs)
    decode = max(statistics.median(r[1] for r in runs), 1e-9)
    cache_tokens = context + new_tokens - 1  # the last generated token is never fed back
    computed = kv_cache_bytes(model.config, next(model.parameters()).element_size(), cache_tokens, batch)
    measured = runs[-1][2]
    return {
        "context": context,
        "batch": batch,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "prefill_seconds": prefill,
        "decode_tokens_per_second": batch * (new_tokens - 1) / decode,
        "cache_tokens": cache_tokens,
        "measured_cache_bytes": measured,
        "computed_cache_bytes": computed,
        "cache_matches": measured == computed,
        "model_memory_bytes": model_memory,
        "peak_memory_bytes": peak,
        "peak_memory_kind": kind,
        "device": str(dev),
    }


def probe_in_child(
    model_path: str,
    context: int,
    new_tokens: int = 32,
    repeats: int = 3,
    device: str = "auto",
    dtype: str = "auto",
    batch: int = 1,
) -> dict:
    """`probe` in a fresh Python process."""
    cmd = [
        sys.executable,
        "-m",
        "kvconvert.evaluation.runtime",
        model_path,
        str(context),
        str(new_tokens),
        str(repeats),
        device,
        dtype,
        str(batch),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"runtime probe failed for {model_path} at context {context}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description="one runtime probe (used by kvconvert eval --contexts)")
    for name, kind in (
        ("model", str),
        ("context", int),
        ("new_tokens", int),
        ("repeats", int),
        ("device", str),
        ("dtype", str),
        ("batch", int),
    ):
        ap.add_argument(name, type=kind)
    a = ap.parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    print(json.dumps(probe(a.model, a.context, a.new_tokens, a.repeats, a.device, a.dtype, a.batch)))


if __name__ == "__main__":
    main()
