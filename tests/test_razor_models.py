"""RazorAttention on the models it is given: sliding-window layers (with and without `layer_types`) in the runtime
and the profile probes, profiles of other models, profiles carried into a merged checkpoint, `--attach` targets."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, DynamicCache

from kvconvert.errors import KVConvertError
from kvconvert.runtime import runtime_for
from kvconvert.runtime.razor import policy_for, runtime_from_policy
from tests.tiny import make_random


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    path = make_random(tmp_path_factory.mktemp("g3") / "g3", "gemma3", heads=4, kv_heads=2, head_dim=16, layers=2)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    assert model.config.layer_types == ["sliding_attention", "full_attention"] and model.config.sliding_window == 8
    return model


def _ids(model, batch: int, length: int, seed: int = 4) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_attached_razor_attention_without_its_cache_keeps_the_sliding_window(gemma3):
    """docs/razor.md: "Without a RazorCache (e.g. use_cache=False) the function is transformers' SDPA". After
    `attach`, a Gemma 3 model run without the razor cache (use_cache=False, or a DynamicCache) must give the stock
    logits; its sliding layers attended to the whole prompt instead, since `razor` builds no mask."""
    model = gemma3
    ids = _ids(model, 2, 27)
    model.set_attn_implementation("sdpa")
    ref = model(input_ids=ids, use_cache=False).logits
    stock = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, use_cache=False)
    rt = runtime_from_policy(model, policy_for(model, [[], [0]]))
    rt.attach(model)
    try:
        assert torch.allclose(model(input_ids=ids, use_cache=False).logits, ref, atol=1e-5, rtol=0)
        got = model(input_ids=ids, past_key_values=DynamicCache(config=model.config)).logits
        assert torch.allclose(got, ref, atol=1e-5, rtol=0)
        ours = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, use_cache=False
        )
        assert torch.equal(ours, stock)
    finally:
        model.set_attn_implementation("sdpa")


@torch.no_grad()
def test_profile_probes_keep_the_sliding_window(gemma3):
    """The ablation probe's copy loss with no head windowed is the stock model's loss, and the echo/induction probe
    runs the stock model: on Gemma 3 both let the sliding layers see the whole probe sequence (their attention names
    have no mask function registered, so the model built no mask at all)."""
    from kvconvert.razor.ablation import row_losses
    from kvconvert.razor.profile import PROBE, ProfileSettings, head_scores

    model = gemma3
    model.set_attn_implementation("sdpa")
    ids = _ids(model, 1, 30, seed=1)
    targets = torch.arange(10, 30)
    want_logits = model(ids).logits
    want = F.cross_entropy(want_logits[0, targets - 1], ids[0, targets])
    rule = {"sinks": 2, "window_floor": 4, "window_fraction": 0.0}
    (got,) = row_losses(model, ids, targets, [torch.zeros(2, 2, dtype=torch.bool)], rule)
    assert float(got) == pytest.approx(float(want), abs=1e-5)
    head_scores(model, ProfileSettings(block=12, repeats=2, queries=8, seeds=(0,)), 0)  # registers the probe
    model.set_attn_implementation(PROBE)
    try:
        assert torch.allclose(model(ids).logits, want_logits, atol=1e-5, rtol=0)
    finally:
        model.set_attn_implementation("sdpa")


@torch.no_grad()
def test_a_sliding_window_without_layer_types_slides_every_layer(tmp_path):
    """Mistral-style configs (`sliding_window` set, no `layer_types`): transformers slides every layer. A razor policy
    that keeps everything must give the DynamicCache's logits and hold what its policy says, and the profile must not
    choose heads in those layers; the razor cache treated every layer as full attention."""
    from kvconvert.razor.run import eligible_heads

    path = make_random(tmp_path / "mistral", "mistral", heads=4, kv_heads=2, head_dim=16, layers=2)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    assert getattr(model.config, "layer_types", None) is None and model.config.sliding_window == 8
    ids = _ids(model, 2, 27)
    ref = model(input_ids=ids, past_key_values=DynamicCache(config=model.config)).logits
    rt = runtime_from_policy(model, policy_for(model, [[0, 1], [0, 1]], window_floor=10_000))
    rt.attach(model)
    cache = rt.new_cache(model, 2)
    got = model(input_ids=ids, past_key_values=cache).logits
    assert torch.allclose(got, ref, atol=1e-5, rtol=0), float((got - ref).abs().max())
    assert cache.storage_bytes() == rt.kv_bytes(27, 2) < rt.policy.full_kv_bytes(27, 2, 4)
    assert not eligible_heads(model.config, 2).any()


def test_a_profile_of_another_model_is_a_one_line_error(tmp_path, tiny_llama, text_b):
    """`eval --cache razor:P` with a profile made for another layer or KV-head count: one line and exit code 2
    (was a ValueError traceback, exit 1), and a recorded head count that differs is refused, not served."""
    from kvconvert.razor.store import SCHEMA

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)  # 2 layers, 4 KV heads
    cases = {
        "layers.json": {"schema": SCHEMA, "retrieval": [[0], [1], [2]]},
        "heads.json": {"schema": SCHEMA, "retrieval": [[0], [7]]},
        "rule.json": {"schema": SCHEMA, "retrieval": [[0], [1]], "runtime": {"window": 8}},
        "other.json": {"schema": SCHEMA, "retrieval": [[0], [1]], "num_layers": 2, "num_kv_heads": 2},
    }
    for name, profile in cases.items():
        (tmp_path / name).write_text(json.dumps(profile))
        with pytest.raises(KVConvertError):
            runtime_for(f"razor:{tmp_path / name}", model)
    args = [sys.executable, "-m", "kvconvert", "--threads", "1", "eval", str(tiny_llama), "--dataset", str(text_b)]
    args += ["--samples", "1", "--seq-len", "16", "--cache", f"razor:{tmp_path / 'layers.json'}"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "kvconvert: error:" in r.stderr, r.stderr


def test_compress_does_not_carry_the_sources_razor_profile(tmp_path, tiny_llama, text_a):
    """`kvconvert profile CKPT --attach`, then `kvconvert compress CKPT --heads 1`: the merged checkpoint's
    config.json kept `kvconvert_razor` (heads of the original's 4 KV heads), so `eval OUT --cache razor` served a
    profile of another model (or failed with a traceback) instead of asking for the merged model's own profile."""
    from kvconvert.razor.store import SCHEMA, attach_profile

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_llama, ckpt)
    attach_profile(ckpt, {"schema": SCHEMA, "retrieval": [[0], [3]], "runtime": {"sinks": 2}})
    out = tmp_path / "merged"
    args = [sys.executable, "-m", "kvconvert", "--threads", "1", "compress", str(ckpt), "--heads", "1"]
    args += ["--dataset", str(text_a), "--samples", "2", "--seq-len", "32", "--output", str(out)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "kvconvert_razor" not in json.loads((out / "config.json").read_text())
    with pytest.raises(KVConvertError, match="carries no retrieval profile"):
        runtime_for("razor", AutoModelForCausalLM.from_pretrained(out))


def test_profile_attach_refuses_a_model_that_is_not_a_checkpoint_directory(tmp_path, tiny_llama, monkeypatch):
    """`kvconvert profile model.gguf -o P.json --attach` (or `smollm2`, or a Hub id): MODEL resolves to a cache
    directory (the GGUF's expansion, the Hub snapshot), and --attach silently rewrote that cache's config.json (which
    later runs and `compress` read as the model's own) after all the profiling. It should refuse, before profiling."""
    from kvconvert import checkpoint
    from kvconvert.config.profile import ProfileRunRequest
    from kvconvert.razor.run import run_profile

    cache = tmp_path / "cache" / "gguf-expansion"
    shutil.copytree(tiny_llama, cache)
    before = (cache / "config.json").read_text()
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(checkpoint, "resolve", lambda spec, **kw: checkpoint.Checkpoint(cache, spec))
    req = ProfileRunRequest(model=str(gguf), output=tmp_path / "p.json", attach=True, block=24, window_floor=8)
    with pytest.raises(KVConvertError, match="--attach"):
        run_profile(req)
    assert (cache / "config.json").read_text() == before
    assert not (tmp_path / "p.json").exists()
