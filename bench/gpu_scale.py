"""GPU part 2: a random Llama-2-7B-shaped MHA checkpoint (bf16, 32 -> 8 KV heads) through `kvconvert calibrate` and
`kvconvert compress --heads 0.25`, each against its floor measured on the same machine in the same run.

Floors: calibrate = matmul FLOPs of one forward over the calibration tokens / the measured bf16 matmul rate of the
layer's own shapes; compress = one plain copy (read + write) of the checkpoint's weight files.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import torch

from bench.gpu_common import KVCONVERT, SMOKE, SMOL, WORK, device, left, run, save, stdlib_text, sync

FULL = dict(layers=32, hidden=4096, heads=32, kv_heads=32, inter=11008, samples=128, seq=2048, batch=8)
TINY = dict(layers=2, hidden=256, heads=4, kv_heads=4, inter=512, samples=4, seq=64, batch=2)


def stage_times(text: str) -> dict[str, float]:
    """The `time by stage` table that `kvconvert compress` prints."""
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"│ ([\w+]+)\s+│\s+([\d.]+) │", text)}


def calibrate_times(text: str) -> dict[str, float]:
    """From `kvconvert calibrate`'s output: its `time by stage` table (load, text, layers, finish), the layer pass
    of its progress line and the command's own clock."""
    out: dict[str, float] = stage_times(text)
    if m := re.search(r"calibrating \(layers\): done, \d+/\d+ in (\d+):(\d+)", text):
        out["layer_pass"] = 60 * int(m.group(1)) + int(m.group(2))
    if m := re.search(r"process\(es\), ([\d.]+)s", text):
        out["command"] = float(m.group(1))
    return out


def random_checkpoint(out: Path, s: dict, dev: torch.device, shard: str = "5GB") -> int:
    """A random bf16 Llama checkpoint (SmolLM2's tokenizer and vocabulary), generated on `dev`, shard by shard."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from kvconvert.checkpoint import resolve

    tok = resolve(SMOL)
    out.mkdir(parents=True, exist_ok=True)
    for f in tok.side_files():
        shutil.copyfile(f, out / f.name)
    h, d = s["hidden"], s["hidden"] // s["heads"]
    config = LlamaConfig(
        vocab_size=tok.config.vocab_size,
        hidden_size=h,
        intermediate_size=s["inter"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=4096,
        bos_token_id=tok.config.bos_token_id,
        eos_token_id=tok.config.eos_token_id,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(out)
    v = config.vocab_size
    shapes = {"model.embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "model.norm.weight": (h,)}
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (s["heads"] * d, h),
            p + "self_attn.k_proj.weight": (s["kv_heads"] * d, h),
        }
        shapes |= {
            p + "self_attn.v_proj.weight": (s["kv_heads"] * d, h),
            p + "self_attn.o_proj.weight": (h, s["heads"] * d),
        }
        shapes |= {p + "mlp.gate_proj.weight": (s["inter"], h), p + "mlp.up_proj.weight": (s["inter"], h)}
        shapes |= {p + "mlp.down_proj.weight": (h, s["inter"])}
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
    metas = {n: torch.empty(sh, dtype=torch.bfloat16, device="meta") for n, sh in shapes.items()}
    split = split_torch_state_dict_into_shards(metas, max_shard_size=shard)
    gen = torch.Generator(dev).manual_seed(0)
    total = 0
    for filename, names in split.filename_to_tensors.items():
        tensors = {}
        for n in names:
            sh = shapes[n]
            if len(sh) == 1:
                tensors[n] = torch.ones(sh, dtype=torch.bfloat16)
            else:
                t = torch.randn(sh, generator=gen, device=dev, dtype=torch.bfloat16) * (sh[1] ** -0.5)
                tensors[n] = t.cpu()
        save_file(tensors, str(out / filename), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if split.is_sharded:
        index = {"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def matmul_rate(s: dict, dev: torch.device) -> float:
    """Best FLOP/s of the layer's (tokens x hidden) @ (hidden x inter) product in the compute dtype (bf16 on GPU)."""
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(s["seq"] * (4 if dev.type == "cuda" else 1), s["hidden"], device=dev, dtype=dtype)
    b = torch.randn(s["hidden"], s["inter"], device=dev, dtype=dtype)
    best = 0.0
    for _ in range(3 if dev.type == "cpu" else 20):
        sync()
        t0 = time.perf_counter()
        for _ in range(1 if dev.type == "cpu" else 10):
            a @ b
        sync()
        n = 1 if dev.type == "cpu" else 10
        best = max(best, n * 2 * a.shape[0] * s["hidden"] * s["inter"] / (time.perf_counter() - t0))
    return best


def copy_seconds(src: Path) -> float:
    """One plain copy (read + write, synced) of every weight file of `src`."""
    import os

    dst = src.parent / (src.name + "-copy")
    dst.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    for f in sorted(src.glob("*.safetensors")):
        shutil.copyfile(f, dst / f.name)
    os.sync()
    seconds = time.perf_counter() - t0
    shutil.rmtree(dst)
    return seconds


def read_seconds(src: Path) -> float:
    """One plain read of every weight file of `src` (from the page cache when it was just written)."""
    t0 = time.perf_counter()
    for f in sorted(src.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(64 * 2**20):
                pass
    return time.perf_counter() - t0


def forward_flops(s: dict) -> float:
    """Matmul FLOPs of one forward of all decoder layers over the calibration tokens (causal attention, no head)."""
    h, d = s["hidden"], s["hidden"] // s["heads"]
    proj = 2 * h * (s["heads"] * d + 2 * s["kv_heads"] * d) + 2 * s["heads"] * d * h
    mlp = 2 * 3 * h * s["inter"]
    attn = 2 * 2 * s["heads"] * d * s["seq"] / 2
    return s["layers"] * s["samples"] * s["seq"] * (proj + mlp + attn)


def main() -> None:
    s = TINY if SMOKE else FULL
    dev = device()
    work = WORK / "scale"
    ckpt = work / "llama7b-shaped"
    result: dict = {"shape": s, "device": str(dev)}
    t0 = time.perf_counter()
    if not (ckpt / "config.json").exists():
        print(f"writing random checkpoint {ckpt}", flush=True)
        random_checkpoint(ckpt, s, dev)
    result["write_random_seconds"] = round(time.perf_counter() - t0, 1)
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    result["checkpoint_bytes"] = size
    result["params"] = size // 2
    rate = matmul_rate(s, dev)
    copy = copy_seconds(ckpt)
    result |= {"matmul_flops_per_s": rate, "copy_seconds": round(copy, 2), "read_seconds": read_seconds(ckpt)}
    result["calibrate_floor_seconds"] = forward_flops(s) / rate
    save("scale", result)

    text = stdlib_text(WORK / "text" / "stdlib-1.5mb.txt", 1_500_000)  # ~450k tokens; pydoc alone is ~110k
    stats, out = work / "stats.safetensors", work / "converted"
    cal = [*KVCONVERT, "calibrate", str(ckpt), "--dataset", str(text), "--samples", str(s["samples"])]
    cal += [
        "--seq-len",
        str(s["seq"]),
        "--batch-size",
        str(s["batch"]),
        "--device",
        "auto",
        "--overwrite",
        "--output",
        str(stats),
    ]
    r = run(cal, work / "calibrate.log", left(300) - 5)
    r["stages"] = calibrate_times(r["log"])
    del r["log"]
    result["calibrate"] = r
    save("scale", result)
    if r["rc"] == 0:
        cmp = [*KVCONVERT, "compress", str(ckpt), "--heads", "0.25", "--stats", str(stats), "--device", "auto"]
        cmp += ["--no-verify", "--overwrite", "--output", str(out)]
        r = run(cmp, work / "compress.log", left(300) - 5)
        r["stages"] = stage_times(r["log"])
        del r["log"]
        result["compress"] = r
    save("scale", result)
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
