"""`kvconvert calibrate` / `compress` used as a user would: option values checked before any work (shard size,
device, a retrieval profile), quantized inputs refused, the card's reproduce command and KV sizes, --reload-check."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from kvconvert.cli import _register, app
from kvconvert.errors import KVConvertError
from tests.tiny import make_model

_register()
runner = CliRunner()

CAL = ("--samples", "4", "--seq-len", "32", "--device", "cpu")


def kvconvert(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kvconvert", "--threads", "1", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def refused(r: subprocess.CompletedProcess, *needles: str) -> str:
    """The CLI's error contract: exit code 2 and one line on stderr (no traceback)."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(lines) == 1, r.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def no_calibration(monkeypatch):
    """Make any calibration fail loudly: checks that cost seconds must come before it."""

    def calibrated(*args, **kwargs):
        raise AssertionError("calibration ran before a cheap check of the arguments")

    monkeypatch.setattr("kvconvert.pipeline.request_windows", calibrated)
    monkeypatch.setattr("kvconvert.pipeline.run_calibration", calibrated)


def compress(model, text, out, *extra: str) -> subprocess.CompletedProcess:
    """`kvconvert compress MODEL --heads 2 --dataset TEXT` (tiny calibration) into `out`, plus `extra`."""
    return kvconvert("compress", str(model), "--heads", "2", "--dataset", str(text), *CAL, "-o", str(out), *extra)


# --- --max-shard-size ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["1GiB", "bogus", "10"])
def test_a_bad_max_shard_size_is_one_line(tiny_llama, tmp_path, text_a, size):
    """`--max-shard-size 1GiB` (or a bare byte count) was a ValueError traceback from huggingface_hub, raised only
    after the whole calibration (or refinement) had run."""
    out = tmp_path / "out"
    r = compress(tiny_llama, text_a, out, "--max-shard-size", size)
    refused(r, "--max-shard-size")
    assert not out.exists()


def test_a_bad_max_shard_size_is_refused_before_calibrating(tiny_llama, tmp_path, text_a, monkeypatch):
    no_calibration(monkeypatch)
    args = ["compress", str(tiny_llama), "--heads", "2", "--dataset", str(text_a), *CAL, "-o", str(tmp_path / "o")]
    r = runner.invoke(app, [*args, "--max-shard-size", "1GiB"])
    assert r.exit_code == 2, r.exception  # a usage error, before any work
    assert "--max-shard-size" in r.output


def test_valid_max_shard_sizes_still_shard(tiny_llama, tmp_path, text_a):
    out = tmp_path / "out"
    r = compress(tiny_llama, text_a, out, "--max-shard-size", "100kb", "--no-verify")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "model.safetensors.index.json").is_file()


# --- --device ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["calibrate", "compress"])
@pytest.mark.parametrize("device", ["gpu", "cuda:x"])
def test_a_device_typo_is_one_line(tiny_llama, tmp_path, text_a, command, device):
    """`--device gpu` was torch's RuntimeError traceback ("Expected one of cpu, cuda, ipu, xpu, ...")."""
    out = tmp_path / ("s.safetensors" if command == "calibrate" else "out")
    args = [command, str(tiny_llama), "--dataset", str(text_a), "--samples", "4", "--seq-len", "32"]
    if command == "compress":
        args += ["--heads", "2"]
    refused(kvconvert(*args, "--device", device, "-o", str(out)), "--device", device)
    assert not out.exists()


# --- checkpoints with dtypes the reader does not know (FP8 checkpoints) -------------------------------------------


def test_an_fp8_checkpoint_is_one_line(tiny_llama, tmp_path, text_a):
    """An FP8 checkpoint (float8_e4m3 weights with a scale, `quantization_config` in config.json) made
    `TensorReader.dtype` raise KeyError: 'F8_E4M3' (a traceback), after the text was tokenized."""
    model = tmp_path / "fp8"
    shutil.copytree(tiny_llama, model)
    tensors = load_file(model / "model.safetensors")
    for name in [n for n in tensors if n.endswith("proj.weight")]:
        tensors[name] = tensors[name].to(torch.float8_e4m3fn)
        tensors[name + "_scale_inv"] = torch.ones(1)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    refused(kvconvert("compress", str(model), "--heads", "2", "--dataset", str(text_a), *CAL, "-o", str(out)))
    assert not out.exists()


def test_an_unknown_tensor_dtype_is_one_line(tiny_llama, tmp_path, text_a):
    """Even without a quantization_config: a float8 tensor anywhere was a KeyError traceback."""
    model = tmp_path / "f8"
    shutil.copytree(tiny_llama, model)
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight_scale"] = torch.ones(1).to(torch.float8_e4m3fn)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    refused(
        kvconvert("compress", str(model), "--heads", "2", "--dataset", str(text_a), *CAL, "-o", str(out)), "F8_E4M3"
    )


# --- --protect-retrieval -------------------------------------------------------------------------------------------


def _profile(path: Path, retrieval) -> Path:
    from kvconvert.razor.store import SCHEMA

    path.write_text(json.dumps({"schema": SCHEMA, "retrieval": retrieval}))
    return path


@pytest.mark.parametrize(
    "retrieval",
    [[[0, 1]], [[0, 7], [9]]],
    ids=["fewer layers (an IndexError traceback)", "KV heads 7 and 9 of a 4-KV-head model (silently ignored)"],
)
def test_a_profile_of_another_model_is_one_line(tiny_llama, tmp_path, text_a, retrieval):
    """A profile made for another model: refused in one line, nothing written."""
    profile = _profile(tmp_path / "p.json", retrieval)
    out = tmp_path / "out"
    args = ["compress", str(tiny_llama), "--heads", "2", "--dataset", str(text_a), *CAL, "-o", str(out)]
    refused(kvconvert(*args, "--protect-retrieval", str(profile)), str(profile))
    assert not out.exists()


@pytest.mark.parametrize("which", ["missing", "fewer layers"])
def test_the_profile_is_checked_before_calibrating(tiny_llama, tmp_path, text_a, monkeypatch, which):
    """The profile was read only after calibration (minutes to hours with `--dataset self` or a 7B model)."""
    no_calibration(monkeypatch)
    profile = tmp_path / "p.json" if which == "missing" else _profile(tmp_path / "p.json", [[0]])
    args = ["compress", str(tiny_llama), "--heads", "2", "--dataset", str(text_a), *CAL, "-o", str(tmp_path / "o")]
    r = runner.invoke(app, [*args, "--protect-retrieval", str(profile)])
    assert isinstance(r.exception, KVConvertError), r.exception
    assert str(profile) in str(r.exception)


# --- the model card -------------------------------------------------------------------------------------------------


def test_the_cards_reproduce_command_includes_the_refinement(tiny_llama, tmp_path, text_a):
    """A refined output's card said "refined: 2 steps per layer on 2 windows (original)", yet its "Reproduce"
    command had no --refine-* option: running it makes the plain merge, another model."""
    out = tmp_path / "out"
    refine = ("--refine-steps", "2", "--refine-samples", "2", "--refine-inputs", "original", "--refine-lr", "0.01")
    r = compress(tiny_llama, text_a, out, *refine, "--no-verify")
    assert r.returncode == 0, r.stderr[-2000:]
    card = (out / "README.md").read_text()
    command = next(line for line in card.splitlines() if line.startswith("kvconvert compress "))
    for option in ("--refine-steps 2", "--refine-samples 2", "--refine-inputs original", "--refine-lr 0.01"):
        assert option in command, command


def test_the_cards_kv_cache_at_the_context_length_counts_sliding_windows(tmp_path, text_a):
    """Mistral with sliding_window 128: every layer keeps at most 127 tokens, so the cache at 512 tokens is 127/512 of
    what the card said (it multiplied bytes per token by the context length, as if every layer kept every token).
    `kvconvert eval` (evaluation/kvcache.py) counts the windows."""
    from transformers import AutoConfig

    from kvconvert.evaluation.kvcache import kv_cache_bytes

    model = make_model(tmp_path / "mistral", "mistral")
    config = json.loads((model / "config.json").read_text())
    config["sliding_window"] = 128
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    r = kvconvert("compress", str(model), "--heads", "2", "--dataset", str(text_a), *CAL, "-o", str(out), "--no-verify")
    assert r.returncode == 0, r.stderr[-2000:]
    row = next(line for line in (out / "README.md").read_text().splitlines() if "KV cache at 512 tokens" in line)
    before, after = (kv_cache_bytes(AutoConfig.from_pretrained(p), 4, 512) for p in (model, out))
    assert row.split("|")[2:4] == [f" {before / 2**20:,.1f} MiB ", f" {after / 2**20:,.1f} MiB "], row


# --- --protect-retrieval with a count that does not divide the KV heads --------------------------------------------


def test_protect_retrieval_where_it_cannot_steer_the_grouping_is_refused(tmp_path, text_a):
    """15 query / 5 KV heads -> 3 (a count that does not divide the KV heads), or --grouping adjacent: the grouping
    never read the profile, so the protected heads could merge without a word. Now that is refused before any work."""
    from kvconvert.pipeline import CalibrationRequest, CompressRequest, run_compress

    model = make_model(tmp_path / "m15", "llama", heads=15, kv_heads=5, head_dim=8)
    calibration = CalibrationRequest(dataset=str(text_a), samples=4, seq_len=32, device="cpu", dtype="float32")
    profile = _profile(tmp_path / "p.json", [[0, 4]] * 2)
    for heads, grouping in (("3", "search"), ("1", "adjacent")):
        req = CompressRequest(str(model), heads, tmp_path / heads, calibration=calibration, grouping=grouping)
        req.protect_retrieval = profile
        with pytest.raises(KVConvertError, match="--protect-retrieval steers --grouping search"):
            run_compress(req)
        assert not (tmp_path / heads).exists()


# --- --reload-check --------------------------------------------------------------------------------------------------


def test_reload_check_runs_when_asked_for_with_no_verify(tiny_llama, tmp_path, text_a):
    """`--no-verify --reload-check` (skip the streamed check, keep the whole-model stock reload) silently ran no
    check at all: the summary said "verify": null and no reload happened."""
    out = tmp_path / "out"
    r = compress(tiny_llama, text_a, out, "--no-verify", "--reload-check", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout)
    assert summary["verify"] is not None and summary["verify"]["ok"], summary
    assert "verify" in summary["timings"]
