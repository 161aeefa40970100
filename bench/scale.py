"""Scale benchmark: stage times against physical floors, and peak memory against checkpoint size.

Writes a random-initialised checkpoint of real shapes (default: TinyLlama-1.1B shapes with one KV head per query
head, bf16, SmolLM2's tokenizer so text can be tokenised), measures this machine's fp32 matmul rate and the time of
one plain copy of the checkpoint, then runs `kvconvert calibrate` and `kvconvert compress` as child processes
(optionally inside a cgroup-v1 memory limit) and reports wall time and peak RSS of each.

    python -m bench.scale --write docs/results/scale.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.corpora import pydoc_all
from kvconvert.io.shards import ShardPlan, write_shards

KVCONVERT = [sys.executable, "-m", "kvconvert"]
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def random_checkpoint(
    out: Path, layers: int, hidden: int, heads: int, kv_heads: int, inter: int, dtype: torch.dtype, shard: str
) -> int:
    """Write a random Llama checkpoint shard by shard (never whole in memory); returns its weight bytes."""
    from transformers import LlamaConfig

    from kvconvert.checkpoint import resolve

    tok_src = resolve("smollm2")
    out.mkdir(parents=True, exist_ok=True)
    for f in tok_src.side_files():
        shutil.copyfile(f, out / f.name)
    config = LlamaConfig(
        vocab_size=tok_src.config.vocab_size,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        bos_token_id=tok_src.config.bos_token_id,
        eos_token_id=tok_src.config.eos_token_id,
        tie_word_embeddings=False,
        dtype=str(dtype).removeprefix("torch."),
    )
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(out)
    d = hidden // heads
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden), "lm_head.weight": (config.vocab_size, hidden)}
    shapes["model.norm.weight"] = (hidden,)
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (heads * d, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * d, hidden),
        }
        shapes |= {
            p + "self_attn.v_proj.weight": (kv_heads * d, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * d),
        }
        shapes |= {p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden)}
        shapes |= {p + "mlp.down_proj.weight": (hidden, inter)}
        shapes |= {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)}
    specs = {n: (dtype, tuple(s)) for n, s in shapes.items()}
    gen = torch.Generator().manual_seed(0)

    def make(name: str) -> torch.Tensor:
        if len(shapes[name]) == 1:
            return torch.ones(shapes[name], dtype=dtype)
        return (torch.randn(shapes[name], generator=gen) * 0.02).to(dtype)

    return write_shards(out, specs, make, ShardPlan.split(specs, shard))


def matmul_rate(hidden: int, inter: int, tokens: int = 2048) -> float:
    """Best fp32 GFLOP/s over a few (tokens x hidden) @ (hidden x inter) products, as a decoder layer does."""
    a, b = torch.randn(tokens, hidden), torch.randn(hidden, inter)
    a @ b
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * tokens * hidden * inter / (time.perf_counter() - t0) / 1e9)
    return best


def copy_seconds(src: Path) -> float:
    """Time of one plain copy (read + write) of every weight file of `src`."""
    with tempfile.TemporaryDirectory(dir=src.parent) as tmp:
        t0 = time.perf_counter()
        for f in sorted(src.glob("*.safetensors")):
            shutil.copyfile(f, Path(tmp) / f.name)
            os.sync()
        return time.perf_counter() - t0


def forward_flops(layers: int, hidden: int, heads: int, kv_heads: int, inter: int, tokens: int, seq: int) -> float:
    """Matmul FLOPs of one forward of all decoder layers over `tokens` tokens (causal attention, no LM head)."""
    d = hidden // heads
    proj = 2 * hidden * (heads * d + 2 * kv_heads * d) + 2 * heads * d * hidden
    mlp = 2 * 3 * hidden * inter
    attn = 2 * 2 * heads * d * seq / 2
    return layers * tokens * (proj + mlp + attn)


def run_child(cmd: list[str], log: Path, memory_limit: int | None = None) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout) of a child process; inside a fresh memory cgroup when limited."""
    group = None
    if memory_limit:
        group = CGROUP_ROOT / f"kvconvert-bench-{os.getpid()}"
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(memory_limit))
        cmd = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *cmd]
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    text = log.read_text()
    if group is not None:
        group.rmdir()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with {proc.returncode}; see {log}:\n{text[-2000:]}")
    return wall, usage.ru_maxrss * 1024, text


def stage_times(text: str) -> dict[str, float]:
    """Seconds by stage from the summary `kvconvert compress --json` prints (the last JSON object in `text`)."""
    start = text.rindex('{\n  "schema_version"')
    summary, _ = json.JSONDecoder().raw_decode(text[start:])
    return summary["timings"]


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--target-heads", default="8")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--shard-size", default="500MB", help="shard size of the random input checkpoint")
    ap.add_argument("--max-shard-size", default="5GB", help="compress --max-shard-size (kvconvert's default: 5GB)")
    ap.add_argument("--no-verify", action="store_true", help="compress --no-verify (verify is on by default)")
    ap.add_argument("--memory-limit", default="", help="e.g. 1.5G: run both stages inside a cgroup with this limit")
    ap.add_argument("--workdir", type=Path, default=Path(".bench-cache/scale"))
    ap.add_argument("--write", type=Path, help="write the Markdown report here")
    args = ap.parse_args()

    work = args.workdir
    ckpt = work / f"llama-{args.layers}x{args.hidden}-{args.heads}h-{args.kv_heads}kv-{args.dtype}"
    dtype = getattr(torch, args.dtype)
    if not (ckpt / "config.json").exists():
        print(f"writing random checkpoint {ckpt}", flush=True)
        random_checkpoint(
            ckpt, args.layers, args.hidden, args.heads, args.kv_heads, args.intermediate, dtype, args.shard_size
        )
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    text_a = pydoc_all()
    limit = _parse_bytes(args.memory_limit) if args.memory_limit else None

    rate = matmul_rate(args.hidden, args.intermediate)
    copy = copy_seconds(ckpt)
    tokens = args.samples * args.seq_len
    flops = forward_flops(args.layers, args.hidden, args.heads, args.kv_heads, args.intermediate, tokens, args.seq_len)
    calib_floor = flops / (rate * 1e9)

    stats = work / "stats.safetensors"
    out = work / "converted"
    calib_cmd = [
        *KVCONVERT,
        "calibrate",
        str(ckpt),
        "--dataset",
        str(text_a),
        "--samples",
        str(args.samples),
        "--seq-len",
        str(args.seq_len),
        "--batch-size",
        str(args.batch_size),
        "--device",
        "cpu",
        "--offload-dir",
        str(work / "offload"),
        "--output",
        str(stats),
    ]
    compress_cmd = [
        *KVCONVERT,
        "compress",
        str(ckpt),
        "--heads",
        args.target_heads,
        "--stats",
        str(stats),
        "--device",
        "cpu",
        "--max-shard-size",
        args.max_shard_size,
        *(["--no-verify"] if args.no_verify else []),
        "--overwrite",
        "--json",
        "--output",
        str(out),
    ]
    print("calibrating ...", flush=True)
    cal_wall, cal_rss, _ = run_child(calib_cmd, work / "calibrate.log", limit)
    print("compressing ...", flush=True)
    cmp_wall, cmp_rss, cmp_text = run_child(compress_cmd, work / "compress.log", limit)
    stages = stage_times(cmp_text)
    verified = next((line for line in cmp_text.splitlines() if line.startswith("verified:")), None)

    rows = [
        ("calibrate (child process)", cal_wall, calib_floor, cal_rss),
        ("compress (child process)", cmp_wall, copy, cmp_rss),
        ("end to end", cal_wall + cmp_wall, calib_floor + copy, max(cal_rss, cmp_rss)),
    ]
    lines = [
        f"checkpoint: {args.layers} layers, hidden {args.hidden}, {args.heads} heads / {args.kv_heads} KV heads, "
        f"MLP {args.intermediate}, {args.dtype}; {gib(size)} of weights; target {args.target_heads} KV heads",
        f"calibration: {args.samples} x {args.seq_len} tokens of pydoc-all, batch {args.batch_size}, hidden states "
        "spilled to disk (--offload-dir)",
        f"machine: {os.cpu_count()} CPU cores, fp32 matmul {rate:.0f} GFLOP/s (measured), one checkpoint copy "
        f"{copy:.1f} s ({size / copy / 2**20:.0f} MiB/s)",
        f"memory limit: {gib(limit) + ' (cgroup v1 memory.limit_in_bytes)' if limit else 'none'}",
        f"shards: input {args.shard_size}, output --max-shard-size {args.max_shard_size}; compress verify "
        f"{'off (--no-verify)' if args.no_verify else 'on (streamed: exact tensors + layer-wise logits)'}",
        "",
        "| stage | wall (s) | floor (s) | wall / floor | peak RSS | RSS / checkpoint |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, wall, floor, rss in rows:
        lines.append(f"| {name} | {wall:.1f} | {floor:.1f} | {wall / floor:.2f} | {gib(rss)} | {rss / size:.2f} |")
    lines += ["", "compress stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items())]
    if "decompose" in stages:
        lines.append(f"decomposition / calibration time: {stages['decompose'] / cal_wall:.1%}")
    if verified is not None:
        lines.append(f"compress output check: {verified}")
    report = "\n".join(lines)
    print(report)
    if args.write:
        cmd = "python -m bench.scale " + " ".join(sys.argv[1:])
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(f"# Scale benchmark\n\nCommand: `{cmd}`\n\n{report}\n")


def _parse_bytes(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


if __name__ == "__main__":
    main()
