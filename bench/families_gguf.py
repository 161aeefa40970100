"""llama.cpp check: does llama.cpp's own convert_hf_to_gguf.py accept the converted checkpoint of every family?

For each registered family: a tiny random model whose KV heads come in identical pairs (as in
tests/test_family_registry.py) is converted to half the KV heads, then handed to llama.cpp's converter, and the
GGUF's `head_count_kv` is checked. The tiny models carry SmolLM2's tokenizer (a BPE llama.cpp recognises). The
converter comes from the llama-cpp-python sdist (no build needed; it needs only the `gguf` package):

    pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/lcp && tar xzf /tmp/lcp/llama_cpp_python-*.tar.gz
    pip install --target /tmp/lcp-deps sentencepiece   # the converter imports it; kept out of the project venv
    python -m bench.families_gguf --llama-cpp /tmp/lcp/llama_cpp_python-*/vendor/llama.cpp \
        --extra-path /tmp/lcp-deps --write docs/results
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from kvconvert.calibrate import calibrate
from kvconvert.checkpoint import Checkpoint, resolve
from kvconvert.config import CalibrateConfig
from kvconvert.converted import Converted
from kvconvert.expand import expand
from kvconvert.export import write_checkpoint
from kvconvert.families import FAMILIES
from kvconvert.pipeline import plan_compression
from tests.tiny import make_random

RANDOM_TEXT = CalibrateConfig(dataset="random", samples=4, seq_len=24, batch_size=4)
"""What the given random windows stand for (recorded in the statistics' source)."""

CPU = torch.device("cpu")


def converted_tiny(family: str, work: Path, tokenizer_dir: Path, vocab: int) -> Path:
    """Tiny `family` model (4 q heads, 2 KV heads in identical pairs) converted to 1 KV head, with a tokenizer."""
    shutil.rmtree(work, ignore_errors=True)
    base = make_random(work / "base", family, heads=4, kv_heads=1, vocab=vocab)
    paired = Checkpoint(expand(Checkpoint(base, "base"), work / "paired", n_new=2, seed=0), "paired")
    windows = torch.randint(3, vocab, (4, 24), generator=torch.Generator().manual_seed(1))
    stats = calibrate(paired, work / "s.safetensors", RANDOM_TEXT, CPU, torch.float32, windows=windows)
    plan = plan_compression(paired, stats, 1, "weighted", "search", CPU)
    out = work / "out"
    write_checkpoint(Converted(paired, plan), out, extra_files={})
    for f in tokenizer_dir.glob("tokenizer*"):
        shutil.copyfile(f, out / f.name)
    return out


def head_count_kv(path: Path) -> int | None:
    from gguf import GGUFReader

    for key, field in GGUFReader(str(path)).fields.items():
        if key.endswith(".attention.head_count_kv"):
            return int(field.parts[field.data[0]][0])
    return None


def check(llama: Path, checkpoint: Path, out: Path, extra: str = "") -> tuple[str, str]:
    env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in (str(llama / "gguf-py"), extra) if p)}
    cmd = [sys.executable, str(llama / "convert_hf_to_gguf.py"), str(checkpoint), "--outfile", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        return "fails", (lines[-1] if lines else f"exit {proc.returncode}")[:160]
    n = head_count_kv(out)
    return ("converts" if n == 1 else "wrong head_count_kv"), f"head_count_kv={n}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source dir with convert_hf_to_gguf.py")
    ap.add_argument("--workdir", type=Path, default=Path(".bench-cache/families-gguf"))
    ap.add_argument("--families", default="", help="comma-separated subset (default: all registered)")
    ap.add_argument("--extra-path", default="", help="PYTHONPATH entry with the converter's own deps (sentencepiece)")
    ap.add_argument("--write", type=Path)
    args = ap.parse_args()
    t0 = time.perf_counter()
    tok = resolve("smollm2")
    vocab = len(__import__("json").loads((tok.path / "tokenizer.json").read_text())["model"]["vocab"])
    known = [f.name for f in FAMILIES]
    names = [n for n in args.families.split(",") if n in known] if args.families else known
    rows = []
    for name in names:
        try:
            ckpt = converted_tiny(name, args.workdir / name, tok.path, vocab)
            status, detail = check(args.llama_cpp, ckpt, args.workdir / f"{name}.gguf", args.extra_path)
        except Exception as exc:  # a failure to build the tiny model is a row too, not the end of the run
            status, detail = "not run", f"{type(exc).__name__}: {exc}"[:160]
        rows.append((name, status, detail))
        print(f"{name:12s} {status:20s} {detail}", flush=True)
        write(args, rows, t0)


def write(args, rows, t0) -> None:
    """The report so far (rewritten after every family, so a run cut short still leaves its rows)."""
    lines = [
        "# llama.cpp check of converted tiny models",
        "",
        f"Command: `python -m bench.families_gguf --llama-cpp LLAMA_CPP_DIR --write docs/results` (llama.cpp's "
        f"convert_hf_to_gguf.py from the llama-cpp-python {args.llama_cpp.parent.parent.name} sdist, default "
        f"outtype; tiny models with SmolLM2's tokenizer, 4 query heads converted 2 -> 1 KV heads). "
        f"Run time {(time.perf_counter() - t0) / 60:.1f} min (contended CPU).",
        "",
        "| family | llama.cpp convert | detail |",
        "|---|---|---|",
        *[f"| {n} | {s} | {d.replace('|', '/')} |" for n, s, d in rows],
    ]
    report = "\n".join(lines) + "\n"
    if args.write:
        args.write.mkdir(parents=True, exist_ok=True)
        (args.write / "families-llamacpp.md").write_text(report)


if __name__ == "__main__":
    main()
