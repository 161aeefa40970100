"""Decode throughput, peak memory and the real KV cache of stock `generate()` at a context length.

On CPU each measurement runs in a child process (`python -m kvconvert.evaluation.runtime`); on CUDA `eval`
measures the model it already holds (`probes_in_process`), which saves a Python start-up, a CUDA context and a
model load per model and context. The model is warmed up with a 2-token generate from a 1-token prompt (every
weight touched, no real cache); the memory in use then is the model's own memory. The peak is then reset and
read again after the first full-length `generate()` (the timing warm-up), so it is the peak of one generate
call: not of loading, and not inflated by what the allocator keeps and fragments across the repeated timing
calls. On CPU it is the process's resident high-water mark (Linux `VmHWM`, reset through `/proc/self/clear_refs`;
elsewhere `ru_maxrss`, which includes loading), on CUDA the allocator's (`torch.cuda.max_memory_allocated`).
What a long `generate()` adds is peak − model.

Timing: one warm-up `generate()`, then the median of `repeats` runs. A no-op logits processor stamps the time of
every step of one ordinary `generate()` call: the first stamp comes right after the prefill, so prefill time is
(first stamp - call start) and decode speed is batch x (new_tokens - 1) / (last stamp - first stamp).
The KV cache that call returns is measured tensor by tensor and compared with the size computed from the config.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from kvconvert.evaluation.kvcache import cache_bytes, kv_cache_bytes


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_bytes(field: str) -> int | None:
    """A `kB` field of /proc/self/status (Linux) in bytes, or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _memory_now(device: torch.device) -> int:
    """Memory in use now: CUDA allocated bytes, or this process's resident set."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    rss = _proc_status_bytes("VmRSS")
    return rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak(device: torch.device) -> bool:
    """Restart peak tracking from the current usage; False where the OS cannot (the peak then includes loading)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
    except OSError:
        return False
    return _proc_status_bytes("VmHWM") is not None


def _peak(device: torch.device, was_reset: bool) -> tuple[int, str]:
    """Peak memory since the reset (or since start where no reset was possible) and what it measures."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    if was_reset:
        return _proc_status_bytes("VmHWM") or 0, "process_peak_rss_after_load"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_max_rss"


class StepClock:
    """A logits processor that changes nothing and records when each generation step's logits are ready."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return scores


def probe(model_path: str, context: int, new_tokens: int, repeats: int, device: str, dtype: str, batch: int) -> dict:
    """Load the model in this process and measure it (see module doc); returns a JSON-ready dict."""
    from kvconvert.checkpoint import resolve
    from kvconvert.modeling import load_model, resolve_device, resolve_dtype

    dev = resolve_device(device)
    return probe_model(
        load_model(resolve(model_path), dev, resolve_dtype(dtype, dev)), context, new_tokens, repeats, batch
    )


def probes_in_process(device: torch.device) -> bool:
    """Whether `eval` probes the model it already holds: on CUDA the allocator's peak since a reset is exactly that
    of one call; a CPU peak is the process's resident high-water mark, which needs a fresh process."""
    return device.type == "cuda"


@torch.no_grad()
def probe_model(model, context: int, new_tokens: int, repeats: int, batch: int) -> dict:
    """Measure a loaded model (see module doc); returns a JSON-ready dict."""
    from transformers import LogitsProcessorList

    if new_tokens < 2:
        raise ValueError("new_tokens must be at least 2 (decode speed is timed between steps)")
    dev = next(model.parameters()).device
    pad = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    one = torch.zeros((1, 1), dtype=torch.long, device=dev)
    model.generate(one, attention_mask=torch.ones_like(one), max_new_tokens=2, do_sample=False, pad_token_id=pad)
    gc.collect()
    model_memory = _memory_now(dev)
    was_reset = _reset_peak(dev)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=gen).to(dev)
    mask = torch.ones_like(ids)

    def run() -> tuple[float, float, int]:
        clock = StepClock(dev)
        synchronize(dev)
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

    run()  # warm-up, and the memory measurement: later calls reuse (and fragment) what the allocator kept
    peak, kind = _peak(dev, was_reset)
    runs = [run() for _ in range(repeats)]
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
