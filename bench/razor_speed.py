"""Decode speed and peak memory of the razor cache vs transformers' `DynamicCache` at long contexts (CPU).

    PYTHONPATH=. python -m bench.razor_speed --profile PROFILE.json --contexts 8192 --json speed.json

Each (method, context) runs in its own process, so its peak resident memory (`ru_maxrss`) is its own: the
prompt (held-out pydoc text, repeated if short) is read in chunks of 512 through the cache keeping only the last
position's logits, then `--decode-tokens` tokens are decoded greedily. Speed is CPU time per decoded token
(`time.process_time`, robust to other jobs on the cores); memory is the peak RSS after the prompt and decode
(VmHWM, reset after loading the model and the text) minus the RSS at that point, and the bytes the cache's
tensors hold.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from kvconvert.compat import cache_kwargs


def _status_mib(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS: now, VmHWM: peak since the last reset), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    """Reset the peak RSS (VmHWM) to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def cache_bytes(cache) -> int:
    """Bytes of the distinct tensor storages a cache holds (RazorCache or DynamicCache)."""
    if hasattr(cache, "storage_bytes"):
        return cache.storage_bytes()
    storages = {}
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


@torch.no_grad()
def measure(model_name: str, method: str, profile: str, context: int, decode: int, text: str, chunk: int) -> dict:
    """One (method, context) run in this process."""
    from transformers import DynamicCache

    from kvconvert.checkpoint import resolve
    from kvconvert.modeling import load_model, load_tokenizer
    from kvconvert.razor.store import load_profile
    from kvconvert.runtime.razor import policy_for, runtime_from_policy

    torch.set_num_threads(1)
    ckpt = resolve(model_name)
    model, tok = load_model(ckpt, torch.device("cpu"), torch.float32), load_tokenizer(ckpt)
    ids = tok(Path(text).read_text(), return_tensors="pt").input_ids
    ids = ids.repeat(1, context // ids.shape[1] + 1)[:, :context]
    if method == "dynamic":
        model.set_attn_implementation("sdpa")
        cache = DynamicCache()
    else:
        p = load_profile(profile)
        rt = runtime_from_policy(model, policy_for(model, p["retrieval"], **p.get("runtime", {})))
        rt.attach(model)
        cache = rt.new_cache()
    _reset_peak()  # loading the model (GGUF dequantisation) peaks higher than anything after it
    base = _status_mib("VmRSS")
    t0 = time.process_time()
    for i in range(0, context, chunk):
        logits = model(input_ids=ids[:, i : i + chunk], **cache_kwargs(cache), logits_to_keep=1).logits
    prefill_cpu = time.process_time() - t0
    nxt, t0 = logits[:, -1:].argmax(-1), time.process_time()
    for _ in range(decode):
        nxt = model(input_ids=nxt, **cache_kwargs(cache), logits_to_keep=1).logits[:, -1:].argmax(-1)
    decode_cpu = time.process_time() - t0
    return {
        "method": method,
        "context": context,
        "prefill_cpu_s": prefill_cpu,
        "decode_cpu_ms_per_token": 1000 * decode_cpu / decode,
        "decode_tokens_per_cpu_s": decode / decode_cpu,
        "cache_mib": cache_bytes(cache) / 2**20,
        "peak_rss_over_model_mib": _status_mib("VmHWM") - base,
    }


def render(rows: list[dict]) -> str:
    out = [
        "| context | method | KV MiB held | peak RSS over model, MiB | decode tokens / CPU s | prefill CPU s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['context']} | {r['method']} | {r['cache_mib']:.1f} | {r['peak_rss_over_model_mib']:.0f} "
            f"| {r['decode_tokens_per_cpu_s']:.2f} | {r['prefill_cpu_s']:.0f} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--profile", default="")
    ap.add_argument("--methods", type=lambda s: s.split(","), default=["dynamic", "razor"])
    ap.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[8192])
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--text", default=".bench-cache/text/pydoc-b.txt")
    ap.add_argument("--json", required=True)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child process: one method, context
    ap.add_argument("--render", action="store_true", help="Print the table of an existing --json file.")
    args = ap.parse_args()
    if args.render:
        print(render(json.loads(Path(args.json).read_text())["rows"]))
        return
    if args.one:
        row = measure(
            args.model, args.methods[0], args.profile, args.contexts[0], args.decode_tokens, args.text, args.chunk
        )
        print(json.dumps(row))
        return
    rows = []
    for context in args.contexts:
        for method in args.methods:
            cmd = [sys.executable, "-m", "bench.razor_speed", "--one", "--model", args.model, "--profile"]
            cmd += [args.profile, "--methods", method, "--contexts", str(context), "--json", "-"]
            cmd += ["--decode-tokens", str(args.decode_tokens), "--chunk", str(args.chunk), "--text", args.text]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    Path(args.json).write_text(json.dumps({"model": args.model, "profile": args.profile, "rows": rows}, indent=1))
    print(render(rows))


if __name__ == "__main__":
    main()
