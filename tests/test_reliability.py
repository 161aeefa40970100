"""The bad-input matrix of docs/reliability.md, one test per row, through the real CLI.

Every refusal: exit code 2, one line on stderr that names the fix, and the output directory untouched or absent.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.tiny import make_model

CAL = ("--samples", "4", "--seq-len", "32", "--device", "cpu")


def kvconvert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvconvert", *args], capture_output=True, text=True, timeout=600)


def compress(model: Path, out: Path, text: Path, *extra: str, heads: str = "2") -> subprocess.CompletedProcess:
    return kvconvert("compress", str(model), "--heads", heads, "--dataset", str(text), *CAL, "-o", str(out), *extra)


def snapshot(directory: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `directory` ({} when it does not exist)."""
    if not directory.exists():
        return {}
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def refused(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Assert the CLI's error contract and return the one stderr line."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def no_temporaries(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if "kvconvert" in p.name and p.name.startswith(".")]


@pytest.fixture
def model_copy(tmp_path, tiny_llama) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_llama, dst)
    return dst


# --- targets and families ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("heads", "needle"), [("3", "does not divide"), ("4", "not lower"), ("8", "not lower")])
def test_head_count_that_does_not_divide_or_does_not_shrink(tiny_llama, tmp_path, text_a, heads, needle):
    out = tmp_path / "out"
    refused(compress(tiny_llama, out, text_a, heads=heads), needle, "valid counts", ": 1, 2")
    assert not out.exists()


def test_unsupported_family(tmp_path, text_a):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "out"
    refused(compress(tmp_path / "gpt2", out, text_a, heads="1"), "GPT2LMHeadModel", "LlamaForCausalLM")
    assert not out.exists()


# --- statistics ----------------------------------------------------------------------------------------------------


def test_statistics_of_another_model(tmp_path, tiny_llama, tiny_qwen2, text_a):
    stats = tmp_path / "llama.safetensors"
    assert kvconvert("calibrate", str(tiny_llama), "--dataset", str(text_a), *CAL, "-o", str(stats)).returncode == 0
    out = tmp_path / "out"
    r = kvconvert("compress", str(tiny_qwen2), "--heads", "2", "--stats", str(stats), "-o", str(out))
    refused(r, "recalibrate")
    assert not out.exists()


def test_nan_in_statistics(tmp_path, tiny_llama, text_a):
    stats = tmp_path / "stats.safetensors"
    assert kvconvert("calibrate", str(tiny_llama), "--dataset", str(text_a), *CAL, "-o", str(stats)).returncode == 0
    with safe_open(str(stats), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(stats)
    tensors["layers.1.sum_xx"][3] = float("nan")
    save_file(tensors, stats, metadata=metadata)
    out = tmp_path / "out"
    refused(
        kvconvert("compress", str(tiny_llama), "--heads", "2", "--stats", str(stats), "-o", str(out)), "NaN", "bfloat16"
    )
    assert not out.exists()


# --- damaged checkpoints -------------------------------------------------------------------------------------------


def test_truncated_shard(model_copy, tmp_path, text_a):
    shard = model_copy / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    out = tmp_path / "out"
    refused(compress(model_copy, out, text_a), "model.safetensors", "re-download")
    assert not out.exists()


def test_corrupted_shard_header(model_copy, tmp_path, text_a):
    shard = model_copy / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:40] = b"}not json at all, not a header{!"
    shard.write_bytes(bytes(data))
    out = tmp_path / "out"
    refused(compress(model_copy, out, text_a), "model.safetensors", "re-download")
    assert not out.exists()


def test_index_that_names_a_missing_shard(model_copy, tmp_path, text_a):
    names = list(load_file(model_copy / "model.safetensors"))
    half = len(names) // 2
    index = {
        "metadata": {},
        "weight_map": {n: ("a.safetensors" if i < half else "b.safetensors") for i, n in enumerate(names)},
    }
    tensors = load_file(model_copy / "model.safetensors")
    save_file({n: tensors[n] for n in names[:half]}, model_copy / "a.safetensors", metadata={"format": "pt"})
    (model_copy / "model.safetensors").unlink()
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    refused(compress(model_copy, out, text_a), "b.safetensors", "missing", "re-download")
    assert not out.exists()


def test_nan_in_checkpoint_weights(model_copy, tmp_path, text_a):
    tensors = load_file(model_copy / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"][0, 0] = float("inf")
    save_file(tensors, model_copy / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    refused(compress(model_copy, out, text_a), "k_proj", "NaN/Inf", "re-download")
    assert not out.exists()


def test_float16_overflow_in_merged_weights(tmp_path, text_a):
    """Four identical value heads of magnitude 40000 merge into one of magnitude 80000: beyond float16's 65504."""
    model = make_model(tmp_path / "fp16", "llama", heads=4, kv_heads=4, dtype=torch.float16)
    tensors = load_file(model / "model.safetensors")
    for layer in range(2):
        v = tensors[f"model.layers.{layer}.self_attn.v_proj.weight"]
        block = torch.full((16, v.shape[1]), 0.0, dtype=torch.float16)
        block[torch.arange(16), torch.arange(16)] = 40000.0
        tensors[f"model.layers.{layer}.self_attn.v_proj.weight"] = block.repeat(4, 1)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    line = refused(compress(model, out, text_a, "--method", "svd", "--dtype", "float32", heads="1"), "overflow")
    assert "bfloat16" in line and "float32" in line
    assert not out.exists()
    no_temporaries(tmp_path)


# --- outputs -------------------------------------------------------------------------------------------------------


def test_non_empty_output_needs_overwrite_and_stays_untouched(tiny_llama, tmp_path, text_a):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("do not lose me")
    before = snapshot(out)
    refused(compress(tiny_llama, out, text_a), "not empty", "--overwrite")
    assert snapshot(out) == before
    r = compress(tiny_llama, out, text_a, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert not (out / "precious.txt").exists() and (out / "config.json").exists()


@pytest.mark.parametrize("where", ["inside", "same"])
def test_output_inside_or_equal_to_the_input(model_copy, text_a, where):
    out = model_copy / "converted" if where == "inside" else model_copy
    before = snapshot(model_copy)
    refused(compress(model_copy, out, text_a), "overlaps the input")
    assert snapshot(model_copy) == before


SIGNAL_TURNED_INTO_A_READ_ERROR = """
import os, signal
import kvconvert.cli as cli
from kvconvert.errors import KVConvertError

def app(**_):
    try:  # as torch does when the signal lands inside its tensor conversion: another exception replaces it
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        pass
    raise KVConvertError("cannot read tensor w from model.safetensors: could not determine the shape")

cli.app, cli._register = app, lambda: None
cli.main()
"""


def test_an_interruption_that_c_code_turned_into_another_error_is_reported_as_one():
    """SIGINT inside safetensors' tensor construction surfaced as torch's "could not determine the shape of object
    type 'torch.storage.UntypedStorage'", which the reader reported as an unreadable tensor (seen in
    test_interrupt_mid_write_... under transformers 5.25's timing): after a signal, any failure is the interruption."""
    r = subprocess.run([sys.executable, "-c", SIGNAL_TURNED_INTO_A_READ_ERROR], capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "interrupted" in lines[0], r.stderr


def test_interrupt_mid_write_leaves_old_output_or_complete_new(tmp_path, text_a):
    """SIGINT while shards are being written: exit 2, no temporary left, the old output intact (never partial)."""
    model = make_model(tmp_path / "big", "llama", heads=16, kv_heads=8, head_dim=32, layers=6)
    out = tmp_path / "out"
    old = compress(model, out, text_a, "--no-verify", heads="4")
    assert old.returncode == 0, old.stderr
    before = snapshot(out)
    cmd = [sys.executable, "-m", "kvconvert", "compress", str(model), "--heads", "2", "--dataset", str(text_a), *CAL]
    cmd += ["-o", str(out), "--overwrite", "--max-shard-size", "2MB", "--no-verify"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tmp = tmp_path / ".out.kvconvert-tmp"
    deadline = time.monotonic() + 300
    while not (tmp.exists() and any(tmp.glob("*.safetensors"))) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    assert proc.poll() is None, "finished before any shard was written; make the model bigger"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    lines = stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "interrupted" in lines[0], stderr
    assert snapshot(out) == before
    no_temporaries(tmp_path)


# --- sources -------------------------------------------------------------------------------------------------------


def test_missing_tokenizer_is_refused_unless_allowed(model_copy, tmp_path, text_a):
    stats = tmp_path / "stats.safetensors"
    assert kvconvert("calibrate", str(model_copy), "--dataset", str(text_a), *CAL, "-o", str(stats)).returncode == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model_copy / name).unlink(missing_ok=True)
    out = tmp_path / "out"
    refused(
        kvconvert("compress", str(model_copy), "--heads", "2", "--stats", str(stats), "-o", str(out)),
        "--allow-missing-tokenizer",
    )
    assert not out.exists()
    r = kvconvert(
        "compress", str(model_copy), "--heads", "2", "--stats", str(stats), "-o", str(out), "--allow-missing-tokenizer"
    )
    assert r.returncode == 0, r.stderr
    assert not (out / "tokenizer.json").exists() and (out / "config.json").exists()


def test_tied_embeddings_convert_and_a_missing_lm_head_is_refused(tmp_path, tiny_qwen2, model_copy, text_a):
    out = tmp_path / "tied"
    r = compress(tiny_qwen2, out, text_a)
    assert r.returncode == 0, r.stderr
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    tensors = load_file(model_copy / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, model_copy / "model.safetensors", metadata={"format": "pt"})
    refused(compress(model_copy, tmp_path / "untied", text_a), "lm_head.weight", "tie_word_embeddings")
    assert not (tmp_path / "untied").exists()


def test_pickle_checkpoint_needs_allow_pickle_and_converts_like_safetensors(tmp_path, tiny_llama, text_a):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_llama, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(tiny_llama / "model.safetensors"), pickled / "pytorch_model.bin")
    assert list(pickled.glob("*.bin")) and not list(pickled.glob("*.safetensors"))
    out = tmp_path / "out"
    refused(compress(pickled, out, text_a), "--allow-pickle", "weights_only")
    assert not out.exists()
    r = compress(pickled, out, text_a, "--allow-pickle")
    assert r.returncode == 0, r.stderr
    reference = compress(tiny_llama, tmp_path / "reference", text_a)
    assert reference.returncode == 0
    assert load_file(out / "model.safetensors").keys() == load_file(tmp_path / "reference" / "model.safetensors").keys()
    got, want = load_file(out / "model.safetensors"), load_file(tmp_path / "reference" / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_remote_code_is_not_run_unless_asked(model_copy, tmp_path, text_a):
    config = json.loads((model_copy / "config.json").read_text())
    config |= {"model_type": "kvconvert_custom", "auto_map": {"AutoConfig": "custom.CustomConfig"}}
    (model_copy / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran"
    (model_copy / "custom.py").write_text(f"open({str(marker)!r}, 'w').write('remote code ran')\n")
    out = tmp_path / "out"
    refused(compress(model_copy, out, text_a), "--trust-remote-code")
    assert not out.exists() and not marker.exists()


@pytest.mark.parametrize("content", ["", "\n\n", "Cache head."])
def test_empty_or_too_short_dataset(tiny_llama, tmp_path, content):
    text = tmp_path / "short.txt"
    text.write_text(content)
    out = tmp_path / "out"
    refused(compress(tiny_llama, out, text), str(text))
    assert not out.exists()


def test_missing_dataset_file(tiny_llama, tmp_path):
    out = tmp_path / "out"
    refused(compress(tiny_llama, out, tmp_path / "nope.txt"), "nope.txt")
    assert not out.exists()


# --- determinism ---------------------------------------------------------------------------------------------------


def test_same_inputs_and_seed_give_byte_identical_outputs(tiny_llama, tmp_path, text_a):
    for name in ("one", "two"):
        r = compress(tiny_llama, tmp_path / name, text_a, "--refine-steps", "2", "--refine-samples", "2")
        assert r.returncode == 0, r.stderr
    one, two = snapshot(tmp_path / "one"), snapshot(tmp_path / "two")
    assert one == two and "model.safetensors" in one and "kvconvert.json" in one and "README.md" in one
