"""Write docs/results/gpu.md from the raw JSON of bench/gpu.sh's parts (docs/results/gpu/*.json)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench.gpu_common import RAW

OUT = Path(os.environ.get("KVC_GPU_REPORT", "docs/results/gpu.md"))


def load(name: str) -> dict | None:
    path = RAW / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def devices(d: dict) -> list[str]:
    lines = ["## 1. Every stage on `--device auto`", "", "| command | exit code | seconds |", "|---|---:|---:|"]
    for name, r in d["steps"].items():
        tests = " ".join(dict.fromkeys(w.split("::")[0] for w in r.get("cmd", "").split() if w.startswith("tests/")))
        label = f"`pytest {tests}` (on the GPU)" if name == "pytest" else f"`kvconvert {name}`"
        lines.append(f"| {label} | {r['rc']} | {r['seconds']} |")
    stages = d["steps"].get("compress", {}).get("stages")
    if stages:
        lines += ["", "compress stages (s): " + ", ".join(f"{k} {v}" for k, v in stages.items())]
    for name, r in d["steps"].items():
        if r["rc"] != 0:
            lines += ["", f"`{name}` output tail:", "", "```", r["tail"][-1200:], "```"]
    return lines


def scale(d: dict) -> list[str]:
    s = d["shape"]
    lines = [
        "## 2. 7B-shaped conversion against the floors",
        "",
        f"Random Llama checkpoint: {s['layers']} layers, hidden {s['hidden']}, {s['heads']} heads / {s['kv_heads']} KV "
        f"heads, MLP {s['inter']}, bf16, {d['params'] / 1e9:.2f} B parameters, {gib(d['checkpoint_bytes'])}; "
        f"`--heads 0.25`. Calibration {s['samples']} x {s['seq']} tokens (batch {s['batch']}).",
        f"Measured here: bf16 matmul {d['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s on the layer's shapes; one copy of "
        f"the weight files {d['copy_seconds']:.1f} s ({d['checkpoint_bytes'] / d['copy_seconds'] / 2**30:.2f} GiB/s).",
        "",
        "| stage | wall (s) | floor (s) | wall / floor | target |",
        "|---|---:|---:|---:|---:|",
    ]
    rows = [
        ("calibrate", d["calibrate_floor_seconds"], "forward FLOPs / matmul rate"),
        ("calibrate", d["calibrate_floor_seconds"] + d.get("read_seconds", 0.0), "FLOPs + one read of the weights"),
        ("compress", d["copy_seconds"], "one read + one write"),
    ]
    for key, floor, what in rows:
        r = d.get(key)
        if r is None:
            lines.append(f"| {key} ({what}) | not run | {floor:.1f} | | 1.5 |")
        elif r["rc"] != 0:
            lines.append(f"| {key} ({what}) | failed (rc {r['rc']}) after {r['seconds']} | {floor:.1f} | | 1.5 |")
        else:
            lines.append(f"| {key} ({what}) | {r['seconds']:.1f} | {floor:.1f} | {r['seconds'] / floor:.2f} | 1.5 |")
    for key in ("calibrate", "compress"):
        stages = (d.get(key) or {}).get("stages")
        if stages:
            lines += ["", f"{key} stages (s): " + ", ".join(f"{k} {v}" for k, v in stages.items())]
    lines += ["", "Wall times are of the child process (Python start-up and checkpoint loading included)."]
    for key in ("calibrate", "compress"):
        r = d.get(key)
        if r and r["rc"] != 0:
            lines += ["", f"`{key}` output tail:", "", "```", r["tail"][-1200:], "```"]
    return lines


def runtime(d: dict) -> list[str]:
    lines = [
        "## 3. Decode where the KV cache matters (SmolLM2-135M shapes, random bf16 weights)",
        "",
        "Stock transformers `DynamicCache`, eager, no attention mask (SDPA with `enable_gqa`); peak = "
        f"`torch.cuda.max_memory_allocated` over the decode steps. SDPA: {d.get('sdpa', '?')}.",
        "",
        "| batch | context | 3 KV: tok/s | 1 KV: tok/s | speed-up | 3 KV: peak | 1 KV: peak | peak ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b, c in pairs(d["points"].get("3", []), d["points"].get("1", [])):
        if b.get("oom") or c.get("oom"):
            lines.append(
                f"| {b['batch']} | {b['context']} | {'OOM' if b.get('oom') else ''} | "
                f"{'OOM' if c.get('oom') else ''} | | | | |"
            )
            continue
        lines.append(
            f"| {b['batch']} | {b['context']} | {b['decode_tokens_per_s']:,.0f} | {c['decode_tokens_per_s']:,.0f} | "
            f"{c['decode_tokens_per_s'] / b['decode_tokens_per_s']:.2f}x | {gib(b['peak_bytes'])} | "
            f"{gib(c['peak_bytes'])} | {b['peak_bytes'] / c['peak_bytes']:.2f}x |"
        )
    lines += graphed_table(d.get("graphed", {}))
    bud = d.get("budget", {})
    if "3" in bud and "1" in bud:
        b3, b1 = bud["3"]["largest_batch"], bud["1"]["largest_batch"]
        lines += [
            "",
            f"Largest batch at {bud['3']['context']} tokens of context inside {gib(bud['3']['budget_bytes'])}: "
            f"3 KV heads {b3}, 1 KV head {b1} ({b1 / max(b3, 1):.2f}x the tokens in the same memory; target 2.5x).",
        ]
    return lines


def pairs(base: list[dict], conv: list[dict]) -> list[tuple[dict, dict]]:
    """The points measured for both models, matched and ordered by (batch, context)."""
    key = lambda r: (r["batch"], r["context"])  # noqa: E731
    by_key = {key(c): c for c in conv}
    matched = [(b, by_key[key(b)]) for b in base if key(b) in by_key]
    return sorted(matched, key=lambda pair: key(pair[0]))


def graphed_table(g: dict) -> list[str]:
    """Static cache, decode step replayed as a CUDA graph (host out of the step), beside the eager step."""
    if "3" not in g or "1" not in g:
        return []
    lines = [
        "",
        "Stock `StaticCache`, the step's mask kept on the GPU, one decode step captured as a CUDA graph and replayed "
        "(bench/static_decode.py; torch's own SDPA choice); eager = the same step without the graph.",
        "",
        "| batch | context | 3 KV: eager ms | 1 KV: eager ms | 3 KV: graph tok/s | 1 KV: graph tok/s | speed-up |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b, c in pairs(g["3"], g["1"]):
        if "error" in b or "error" in c:
            err = b.get("error") or c.get("error")
            lines.append(f"| {b['batch']} | {b['context']} | failed: {err[:120]} | | | | |")
            continue
        eager = f"| {b['batch']} | {b['context']} | {b['eager_step_ms']:.1f} | {c['eager_step_ms']:.1f} |"
        if "graph_tokens_per_s" not in b or "graph_tokens_per_s" not in c:
            lines.append(eager + " | | |")
            continue
        tb, tc = b["graph_tokens_per_s"], c["graph_tokens_per_s"]
        lines.append(eager + f" {tb:,.0f} | {tc:,.0f} | {tc / tb:.2f}x |")
    return lines


def razor(d: dict) -> list[str]:
    lines = [
        "## 5. RazorAttention cache against `DynamicCache` (SmolLM2-135M shapes, random bf16 weights)",
        "",
        f"{d['retrieval_heads']} of {d['of_heads']} KV heads whole, the rest sinks + window + compensation token (the "
        "runtime's default rule); prompt prefilled in chunks of 2048, then greedy decode; peak over both.",
        "",
        "| batch | context | cache | decode tok/s | step ms | KV held | peak | prefill s |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in d["points"]:
        if "error" in r:
            lines.append(f"| {r['batch']} | {r['context']} | {r['kind']} | failed: {r['error'][:100]} | | | | |")
            continue
        peak = gib(r["peak_bytes"]) if r.get("peak_bytes") else ""
        lines.append(
            f"| {r['batch']} | {r['context']} | {r['kind']} | {r['decode_tokens_per_s']:,.0f} | {r['step_ms']:.1f} | "
            f"{gib(r['cache_bytes'])} | {peak} | {r['prefill_seconds']} |"
        )
    return lines


def heal(d: dict) -> list[str]:
    lines = [
        "## 4. Heal curve from the refined merge (SmolLM2-135M-Instruct, 3 -> 1 KV heads)",
        "",
        f"Original perplexity {d['original_perplexity']:.2f} on {d['held_out']}; refined merge "
        f"{d['refined_merge_perplexity']:.2f} (merge + refine {d['merge_seconds']} s). `--train all`, batch "
        f"{d['batch']} x {d['seq_len']}, {d['planned_tokens']:,} tokens planned.",
        "",
        "| tokens | training seconds | perplexity | / original |",
        "|---:|---:|---:|---:|",
    ]
    for p in d["curve"]:
        ratio = p["perplexity"] / d["original_perplexity"]
        lines.append(f"| {p['tokens']:,} | {p['seconds']} | {p['perplexity']:.2f} | {ratio:.2f} |")
    if d.get("stopped_early"):
        lines += ["", "Stopped early at this part's time budget."]
    return lines


def main() -> None:
    cmd = (RAW / "command.txt").read_text().strip() if (RAW / "command.txt").exists() else "?"
    lines = ["# GPU results", "", "Run: `bench/gpu.sh` (see docs/gpu.md). Recorded:", "", "```", cmd, "```", ""]
    notes = RAW / "notes.md"  # what a person adds to a run: how it was called, what it showed, what changed since
    if notes.exists():
        lines += [notes.read_text().strip(), ""]
    any_smoke = False
    parts = (("devices", devices), ("scale", scale), ("runtime", runtime), ("heal", heal), ("razor", razor))
    for name, render in parts:
        d = load(name)
        if d is None:
            lines += [f"## {name}: no result (the part failed or was skipped; see the log)", ""]
            continue
        any_smoke |= d.get("smoke", False)
        try:
            lines += [*render(d), "", f"Card: {d['card']}; torch {d['torch']}.", ""]
        except (KeyError, TypeError, ZeroDivisionError) as exc:
            lines += [f"## {name}: incomplete result ({type(exc).__name__}: {exc}); raw: {RAW / name}.json", ""]
    if any_smoke:
        lines.insert(2, "**SMOKE RUN (tiny sizes): these numbers only show that the script works.**\n")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
