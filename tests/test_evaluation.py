"""`kvconvert eval`: JSON schema and KV accounting on tiny models (timings are never asserted)."""

import json

import pytest
from typer.testing import CliRunner

from kvconvert.cli import _register, app
from kvconvert.pipeline import CalibrationRequest, CompressRequest, run_compress
from tests.tiny import make_model

_register()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny 8-query/4-KV model and its 1-KV-head conversion."""
    root = tmp_path_factory.mktemp("eval")
    base = make_model(root / "base", "llama", heads=8, kv_heads=4)
    out = root / "conv"
    cal = CalibrationRequest(dataset="self", samples=4, seq_len=32, batch_size=4, device="cpu")
    run_compress(CompressRequest(str(base), "1", out, calibration=cal))
    return base, out


def test_eval_json_schema_and_kv_accounting(pair, text_b):
    base, conv = pair
    args = [
        "eval",
        str(conv),
        "--baseline",
        str(base),
        "--dataset",
        str(text_b),
        "--samples",
        "2",
        "--seq-len",
        "32",
        "--contexts",
        "16,48",
        "--new-tokens",
        "4",
        "--repeats",
        "1",
        "--json",
    ]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["schema"] == "kvconvert-eval/1"
    assert {"dataset", "samples", "seq_len", "seed", "device", "dtype", "contexts", "tokens_sha256"} <= set(report)
    assert report["contexts"] == [16, 48]
    b, m = report["baseline"], report["model"]
    assert (b["num_key_value_heads"], m["num_key_value_heads"]) == (4, 1)
    for entry, n_kv in ((b, 4), (m, 1)):
        kv = entry["kv_cache"]
        assert kv["bytes_per_token"] == 2 * 2 * n_kv * 16 * 4  # K+V, 2 layers, head_dim 16, float32
        assert kv["measured_matches"] and kv["measured_bytes_per_token"] == kv["bytes_per_token"]
        assert kv["bytes_at_context"] == {"16": kv["bytes_per_token"] * 16, "48": kv["bytes_per_token"] * 48}
        assert [p["context"] for p in entry["runtime"]] == [16, 48]
        for p in entry["runtime"]:
            assert p["decode_tokens_per_second"] > 0 and p["peak_memory_bytes"] > 0 and p["new_tokens"] == 4
    assert report["comparison"]["kv_bytes_ratio"] == 0.25 == report["comparison"]["kv_heads_ratio"]
    assert set(report["comparison"]["decode_speedup_at_context"]) == {"16", "48"}


def test_eval_table_without_baseline(pair, text_b):
    _, conv = pair
    r = CliRunner().invoke(app, ["eval", str(conv), "--dataset", str(text_b), "--samples", "2", "--seq-len", "32"])
    assert r.exit_code == 0, r.output
    assert "perplexity" in r.stdout and "= computed" in r.stdout


def test_bad_contexts_are_a_usage_error(pair):
    _, conv = pair
    r = CliRunner().invoke(app, ["eval", str(conv), "--contexts", "512,lots"])
    assert r.exit_code == 2
