"""Decode throughput and peak memory of stock `generate()` at a context length.

Each measurement runs in a child process (`python -m kvconvert.evaluation.runtime`), so the peak resident memory
it reports on CPU is that of loading the model and generating, and nothing else; on CUDA it is the allocator's
peak. Timings take a warm-up run, then the median of repeats; decode speed is new tokens over (time of prefill +
new tokens − time of prefill alone).
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def probe(model_path: str, context: int, new_tokens: int, repeats: int, device: str, dtype: str, batch: int) -> dict:
    """Measure in this process (see module doc); returns a JSON-ready dict."""
    from kvconvert.checkpoint import resolve
    from kvconvert.modeling import load_model, resolve_device, resolve_dtype

    dev = resolve_device(device)
    model = load_model(resolve(model_path), dev, resolve_dtype(dtype, dev))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=gen).to(dev)
    mask = torch.ones_like(ids)
    pad = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0

    def run(n: int) -> float:
        _sync(dev)
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad)
        _sync(dev)
        return time.perf_counter() - t0

    run(new_tokens + 1)  # warm-up
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    prefill = statistics.median(run(1) for _ in range(repeats))
    total = statistics.median(run(new_tokens + 1) for _ in range(repeats))
    if dev.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(dev), "cuda_max_memory_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_max_rss"
    decode = max(total - prefill, 1e-9)
    return {
        "context": context,
        "batch": batch,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "prefill_seconds": prefill,
        "decode_tokens_per_second": batch * new_tokens / decode,
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
