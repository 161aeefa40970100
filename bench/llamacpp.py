"""Second runtime: convert checkpoints with llama.cpp's own convert_hf_to_gguf.py and score them with
llama-perplexity, next to transformers scoring the same tokens with the same protocol.

llama-perplexity tokenizes the whole file (BOS first when the vocab adds one), cuts it into n_ctx-token chunks,
puts BOS at the start of each chunk and scores only the second half of each chunk; `hf_perplexity` does exactly
that with stock transformers. Needs a llama.cpp source tree with `llama-perplexity` built (see
docs/evaluation.md); nothing of llama.cpp is part of this repository.

    python -m bench.llamacpp --llama-cpp LLAMA_CPP_DIR --models smollm2,out/smollm2-1kv \
        --write docs/results/llamacpp.md
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from bench.corpora import pydoc_split
from kvconvert.checkpoint import resolve
from kvconvert.modeling import load_model, load_tokenizer


def gguf_field(path: Path, key: str):
    """One scalar metadata value of a GGUF file."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields[key]
    return field.parts[field.data[0]][0].item()


def convert(llama: Path, checkpoint: Path, out: Path) -> Path:
    env = os.environ | {"PYTHONPATH": str(llama / "gguf-py")}
    cmd = [
        sys.executable,
        str(llama / "convert_hf_to_gguf.py"),
        str(checkpoint),
        "--outfile",
        str(out),
        "--outtype",
        "f32",
    ]
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    return out


def llama_perplexity(llama: Path, gguf: Path, text: Path, ctx: int, chunks: int) -> float:
    binary = llama / "build" / "bin" / "llama-perplexity"
    cmd = [
        str(binary),
        "-m",
        str(gguf),
        "-f",
        str(text),
        "-c",
        str(ctx),
        "--chunks",
        str(chunks),
        "-t",
        str(os.cpu_count() or 2),
        "-b",
        str(ctx),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    match = re.search(r"Final estimate: PPL = ([\d.]+)", done.stdout + done.stderr)
    if not match:
        raise RuntimeError(f"no perplexity in llama-perplexity output:\n{done.stderr[-2000:]}")
    return float(match.group(1))


@torch.no_grad()
def hf_perplexity(checkpoint, text: Path, ctx: int, chunks: int, add_bos: bool) -> float:
    """llama-perplexity's protocol with stock transformers (float32, CPU)."""
    tok = load_tokenizer(checkpoint)
    model = load_model(checkpoint, torch.device("cpu"), torch.float32)
    ids = tok(text.read_text(), add_special_tokens=False)["input_ids"]
    if add_bos:
        ids = [tok.bos_token_id, *ids]
    nll, count = 0.0, 0
    for i in range(min(chunks, len(ids) // ctx)):
        chunk = torch.tensor(ids[i * ctx : (i + 1) * ctx])
        if add_bos:
            chunk[0] = tok.bos_token_id
        logits = model(chunk[None]).logits[0].double()
        first = ctx // 2
        logp = torch.log_softmax(logits[first : ctx - 1], dim=-1)
        nll -= float(logp.gather(1, chunk[first + 1 :, None]).sum())
        count += ctx - 1 - first
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--llama-cpp", type=Path, required=True, help="llama.cpp source tree with build/bin/llama-perplexity"
    )
    ap.add_argument("--models", default="smollm2", help="comma-separated checkpoints (dirs, or `smollm2`)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--workdir", type=Path, default=Path(".bench-cache/llamacpp"))
    ap.add_argument("--write", type=Path)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    _, text = pydoc_split()
    rows = []
    for spec in args.models.split(","):
        ckpt = resolve(spec)
        gguf = convert(args.llama_cpp, ckpt.path, args.workdir / f"{Path(spec).name}-f32.gguf")
        kv = gguf_field(gguf, "llama.attention.head_count_kv")
        add_bos = bool(gguf_field(gguf, "tokenizer.ggml.add_bos_token"))
        ours = hf_perplexity(ckpt, text, args.ctx, args.chunks, add_bos)
        theirs = llama_perplexity(args.llama_cpp, gguf, text, args.ctx, args.chunks)
        rows.append((spec, kv, theirs, ours))
        print(f"{spec}: llama.cpp {theirs:.4f}, transformers {ours:.4f}", flush=True)
    lines = [
        "# llama.cpp check",
        "",
        f"Command: `python -m bench.llamacpp {' '.join(sys.argv[1:])}`",
        "",
        f"Each checkpoint converted by llama.cpp's `convert_hf_to_gguf.py --outtype f32`, scored by `llama-perplexity "
        f"-c {args.ctx} --chunks {args.chunks}` on pydoc-b, and by stock transformers on the same tokens with the same "
        "protocol (BOS at each chunk start, second half of each chunk scored).",
        "",
        "| checkpoint | KV heads in the GGUF | llama.cpp perplexity | transformers perplexity | difference |",
        "|---|---:|---:|---:|---:|",
    ]
    for spec, kv, theirs, ours in rows:
        lines.append(f"| {spec} | {kv} | {theirs:.4f} | {ours:.4f} | {100 * (theirs / ours - 1):+.2f}% |")
    text_out = "\n".join(lines) + "\n"
    print(text_out)
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(text_out)


if __name__ == "__main__":
    main()
