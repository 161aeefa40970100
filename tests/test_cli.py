"""The CLI parses, calls the library, and turns input errors into one line + exit code 2."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from kvconvert.cli import _register, app
from kvconvert.errors import KVConvertError
from kvconvert.families import AttentionGeometry
from kvconvert.targets import parse_heads, valid_counts

_register()
runner = CliRunner()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvconvert", *args], capture_output=True, text=True)


def test_calibrate_then_compress_then_eval(tmp_path, tiny_llama, text_a, text_b):
    stats = tmp_path / "stats.safetensors"
    r = runner.invoke(
        app,
        [
            "calibrate",
            str(tiny_llama),
            "--dataset",
            str(text_a),
            "--samples",
            "4",
            "--seq-len",
            "32",
            "--device",
            "cpu",
            "--output",
            str(stats),
        ],
    )
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    r = runner.invoke(app, ["compress", str(tiny_llama), "--heads", "0.25", "--stats", str(stats), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "time by stage" in r.output and "verified" in r.output
    record = json.loads((out / "kvconvert.json").read_text())
    assert record["num_key_value_heads"] == {"before": 4, "after": 1}
    assert len(record["layers"]) == 2 and record["calibration"]["dataset"] == str(text_a)
    r = runner.invoke(
        app,
        [
            "eval",
            str(out),
            "--baseline",
            str(tiny_llama),
            "--dataset",
            str(text_b),
            "--samples",
            "2",
            "--seq-len",
            "32",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["model"]["kv_cache"]["bytes_per_token"] * 4 == report["baseline"]["kv_cache"]["bytes_per_token"]
    assert report["model"]["perplexity"] > 1 and report["baseline"]["perplexity"] > 1


@pytest.mark.parametrize(("heads", "message"), [("3", "does not divide"), ("4", "not lower"), ("0.3", "keeps")])
def test_bad_heads_exit_2_with_one_line(tiny_llama, tmp_path, heads, message):
    r = cli("compress", str(tiny_llama), "--heads", heads, "-o", str(tmp_path / "o"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "valid counts" in lines[0]
    assert not (tmp_path / "o").exists()


def test_unsupported_family_names_the_supported_ones(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    r = cli("compress", str(tmp_path / "gpt2"), "--heads", "1", "-o", str(tmp_path / "o"))
    assert r.returncode == 2
    assert "GPT2LMHeadModel" in r.stderr and "LlamaForCausalLM" in r.stderr and "Qwen2ForCausalLM" in r.stderr


def test_valid_counts_and_parsing():
    geom = AttentionGeometry(576, 30, 9, 3, 64, 64)
    assert valid_counts(geom) == [1]
    assert parse_heads("1", geom) == 1
    mha = AttentionGeometry(4096, 32, 32, 32, 128, 128)
    assert valid_counts(mha) == [1, 2, 4, 8, 16]
    assert parse_heads("0.25", mha) == 8 and parse_heads("16", mha) == 16
    with pytest.raises(KVConvertError, match=r"valid counts .*: 1, 2, 4, 8, 16"):
        parse_heads("12", mha)
    with pytest.raises(KVConvertError):
        parse_heads("half", mha)
