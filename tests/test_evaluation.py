"""`kvconvert eval`: JSON schema and KV accounting on tiny models (timings are never asserted)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from kvconvert.cli import _register, app
from kvconvert.evaluation.kvcache import kv_cache_bytes, kv_report, layer_windows
from kvconvert.evaluation.runtime import probe, probe_model, probes_in_process
from kvconvert.modeling import load_model
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
        per_token = 2 * 2 * n_kv * 16 * 4  # K+V, 2 layers, head_dim 16, float32
        assert kv["bytes_per_token"] == per_token
        assert kv["measured_matches"] and kv["measured_bytes"] == kv["computed_bytes"] == per_token * 32
        assert kv["bytes_at_context"] == {"16": per_token * 16, "48": per_token * 48}
        assert [p["context"] for p in entry["runtime"]] == [16, 48]
        for p in entry["runtime"]:
            assert p["new_tokens"] == 4 and p["batch"] == 1 and p["cache_tokens"] == p["context"] + 3
            assert p["cache_matches"] and p["measured_cache_bytes"] == per_token * p["cache_tokens"]
            assert p["decode_tokens_per_second"] > 0 and p["prefill_seconds"] > 0
            assert 0 < p["model_memory_bytes"] <= p["peak_memory_bytes"]
            assert p["peak_memory_kind"] == "process_peak_rss_after_load"  # Linux: the loading peak is excluded
    c = report["comparison"]
    assert c["kv_bytes_ratio"] == 0.25 == c["kv_heads_ratio"]
    assert set(c["decode_speedup_at_context"]) == set(c["peak_memory_saved_bytes_at_context"]) == {"16", "48"}
    assert c["perplexity_ratio"] == m["perplexity"] / b["perplexity"]


def test_eval_table_without_baseline(pair, text_b):
    _, conv = pair
    r = CliRunner().invoke(app, ["eval", str(conv), "--dataset", str(text_b), "--samples", "2", "--seq-len", "32"])
    assert r.exit_code == 0, r.output
    assert "perplexity" in r.stdout and "= computed" in r.stdout


def test_self_text_is_sampled_from_the_baseline(pair):
    """With a baseline, `--dataset self` scores both models on the baseline's samples (the reference text)."""
    from kvconvert.evaluation import evaluate

    base, conv = pair
    kw = {"dataset": "self", "samples": 2, "seq_len": 16, "device": "cpu"}
    both = evaluate(str(conv), baseline=str(base), **kw)
    assert both["tokens_sha256"] == evaluate(str(base), **kw)["tokens_sha256"]
    assert both["tokens_sha256"] != evaluate(str(conv), **kw)["tokens_sha256"]


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """A tiny Mistral whose layers keep only a sliding window of 8 tokens (7 cached)."""
    path = make_model(tmp_path_factory.mktemp("swa"), "mistral", heads=4, kv_heads=2)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"sliding_window": 8}))
    return path


def test_kv_accounting_follows_sliding_windows(windowed):
    model = load_model(str(windowed), torch.device("cpu"), torch.float32)
    assert layer_windows(model.config) == [7, 7]
    per_token = 2 * 2 * 2 * 16 * 4
    assert kv_cache_bytes(model.config, 4, 5) == per_token * 5
    assert kv_cache_bytes(model.config, 4, 30, batch=3) == per_token * 7 * 3
    report = kv_report(model, [4, 100], tokens=20)
    assert report["measured_bytes"] == report["computed_bytes"] == per_token * 7
    assert report["bytes_at_context"] == {"4": per_token * 4, "100": per_token * 7}


def test_runtime_probe_measures_the_generate_cache(windowed):
    p = probe(str(windowed), context=12, new_tokens=3, repeats=1, device="cpu", dtype="float32", batch=2)
    assert p["cache_tokens"] == 14 and p["cache_matches"]
    assert p["measured_cache_bytes"] == 2 * 2 * 2 * 16 * 4 * 7 * 2  # window-limited, batch 2


def test_a_held_model_probes_like_a_freshly_loaded_one(windowed):
    """The in-process probe (CUDA's) measures what the child's does: the same cache, tokens and fields."""
    fresh = probe(str(windowed), context=12, new_tokens=3, repeats=1, device="cpu", dtype="float32", batch=2)
    held = probe_model(load_model(str(windowed), torch.device("cpu"), torch.float32), 12, 3, 1, 2)
    assert set(held) == set(fresh)
    same = ("cache_tokens", "measured_cache_bytes", "computed_cache_bytes", "cache_matches", "batch", "device")
    assert {k: held[k] for k in same} == {k: fresh[k] for k in same}


def test_eval_probes_the_model_it_holds_only_where_the_peak_allows(pair, text_b, monkeypatch):
    from kvconvert.evaluation import report as report_module
    from kvconvert.evaluation.report import evaluate

    base, conv = pair
    assert probes_in_process(torch.device("cuda")) and not probes_in_process(torch.device("cpu"))
    children = []

    def child(spec, context, *args):
        children.append((spec, context))
        return probe(spec, context, *args)

    monkeypatch.setattr(report_module, "probe_in_child", child)
    kwargs = dict(baseline=str(base), dataset=str(text_b), samples=2, seq_len=16, contexts=[8, 20], new_tokens=3)
    on_cpu = evaluate(str(conv), **kwargs, repeats=1, device="cpu")
    assert children == [(str(base), 8), (str(base), 20), (str(conv), 8), (str(conv), 20)]
    monkeypatch.setattr(report_module, "probes_in_process", lambda device: True)  # as on CUDA
    held = evaluate(str(conv), **kwargs, repeats=1, device="cpu")
    assert len(children) == 4  # no child this time
    for role in ("baseline", "model"):
        for a, b in zip(on_cpu[role]["runtime"], held[role]["runtime"], strict=True):
            assert a["cache_matches"] and b["cache_matches"]
            assert (a["context"], a["measured_cache_bytes"]) == (b["context"], b["measured_cache_bytes"])


def test_bad_contexts_are_a_usage_error(pair):
    _, conv = pair
    r = CliRunner().invoke(app, ["eval", str(conv), "--contexts", "512,lots"])
    assert r.exit_code == 2


def test_sequences_beyond_the_trained_length_are_warned_about():
    """`--seq-len 1024` or `--contexts 600` on a model of 512 positions was measured without a word."""
    from types import SimpleNamespace

    from kvconvert.evaluation.report import beyond_trained_length

    config = SimpleNamespace(max_position_embeddings=512)
    assert beyond_trained_length(config, [512, 480 + 32]) == []
    (warning,) = beyond_trained_length(config, [256, 600 + 32])
    assert "632" in warning and "512" in warning
    assert beyond_trained_length(SimpleNamespace(), [10**6]) == []  # no limit known: nothing to say
