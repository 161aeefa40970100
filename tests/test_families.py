"""Every family, tied and untied, converts and round-trips through stock from_pretrained."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvconvert.checkpoint import resolve
from kvconvert.errors import KVConvertError
from kvconvert.expand import expand_to_mha
from kvconvert.pipeline import CalibrationRequest, CompressRequest, RefineRequest, run_calibration, run_compress
from tests.tiny import make_model

CAL = CalibrationRequest(dataset="self", samples=4, seq_len=32, batch_size=4, device="cpu")


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("tied", [False, True])
def test_family_round_trip(tmp_path, family, tied):
    src = make_model(tmp_path / "src", family, tied=tied)
    out = tmp_path / "out"
    result = run_compress(CompressRequest(str(src), "0.5", out, calibration=CAL))
    assert result.verify is not None and result.verify.ok
    before = json.loads((src / "config.json").read_text())
    after = json.loads((out / "config.json").read_text())
    assert {k for k in before if before[k] != after.get(k)} == {"num_key_value_heads"}
    assert after["num_key_value_heads"] == 2
    model = AutoModelForCausalLM.from_pretrained(out)
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.weight.shape == (2 * 16, 128)
    if family == "qwen2":
        assert attn.k_proj.bias.shape == (32,) and attn.q_proj.bias.shape == (128,)
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied
    for name in ("tokenizer.json", "tokenizer_config.json", "kvconvert.json", "README.md", "generation_config.json"):
        assert (out / name).exists(), name


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_expanded_shuffled_model_merges_back_exactly(tmp_path, family):
    """MHA expansion of a GQA model (with biases, tied embeddings) merged back recovers its logits."""
    src = make_model(tmp_path / "src", family, heads=8, kv_heads=2, tied=True)
    mha = expand_to_mha(resolve(str(src)), tmp_path / "mha", seed=0)
    assert json.loads((mha / "config.json").read_text())["num_key_value_heads"] == 8
    out = tmp_path / "back"
    result = run_compress(CompressRequest(str(mha), "2", out, calibration=CAL))
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    original = AutoModelForCausalLM.from_pretrained(src)(ids).logits
    expanded = AutoModelForCausalLM.from_pretrained(mha)(ids).logits
    merged = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    torch.testing.assert_close(expanded, original, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, original, atol=1e-4, rtol=1e-4)
    groups = {tuple(sorted(h.kv_heads)) for lp in result.plan.layers for h in lp.heads}
    assert all(len(g) == 4 for g in groups)


def test_bfloat16_checkpoint_stays_bfloat16(tmp_path):
    src = make_model(tmp_path / "src", "llama", dtype=torch.bfloat16)
    out = tmp_path / "out"
    run_compress(CompressRequest(str(src), "1", out, calibration=CAL))
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.model.layers[0].self_attn.k_proj.weight.dtype == torch.bfloat16
    assert model.config.num_key_value_heads == 1


def test_sharded_output_has_an_index_and_reloads(tmp_path):
    src = make_model(tmp_path / "src", "mistral")
    out = tmp_path / "out"
    run_compress(CompressRequest(str(src), "2", out, calibration=CAL, max_shard_size="100KB"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert AutoModelForCausalLM.from_pretrained(out).config.num_key_value_heads == 2


@pytest.mark.parametrize("inputs", ["sequential", "original"])
def test_refined_output_reloads_and_each_layer_error_drops(tmp_path, text_a, inputs):
    """8 distinct KV heads merged into 1 is lossy in every layer; fitting each layer lowers its error."""
    src = make_model(tmp_path / "src", "llama", kv_heads=8, layers=3, tied=True)
    out = tmp_path / "out"
    cal = CalibrationRequest(dataset=str(text_a), samples=8, seq_len=32, batch_size=4, device="cpu")
    refine = RefineRequest(steps=25, samples=8, inputs=inputs)
    result = run_compress(CompressRequest(str(src), "1", out, calibration=cal, refine=refine))
    assert result.verify.ok and "refine" in result.timings
    layers = json.loads((out / "kvconvert.json").read_text())["refine"]["layers"]
    assert len(layers) == 3
    assert all(r["kept"] and r["error_after"] < 0.9 * r["error_before"] for r in layers), layers
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert plain.model.layers[0].self_attn.k_proj.weight.shape == (16, 128)


def test_refine_with_a_stats_file_rebuilds_its_windows(tmp_path, text_a):
    src = make_model(tmp_path / "src", "llama", layers=2)
    stats = tmp_path / "stats.safetensors"
    cal = CalibrationRequest(dataset=str(text_a), samples=4, seq_len=32, batch_size=2, device="cpu")
    run_calibration(resolve(str(src)), cal, stats)
    req = CompressRequest(str(src), "2", tmp_path / "out", stats=stats, refine=RefineRequest(steps=5, samples=4))
    assert run_compress(req).verify.ok
    text_a_copy = tmp_path / "a.txt"
    text_a_copy.write_text(text_a.read_text())
    other = CalibrationRequest(dataset=str(text_a_copy), samples=4, seq_len=32, batch_size=2, device="cpu")
    run_calibration(resolve(str(src)), other, stats)
    text_a_copy.write_text("Short and changed. " * 400)
    with pytest.raises(KVConvertError, match="no longer gives the windows"):
        run_compress(CompressRequest(str(src), "2", tmp_path / "out2", stats=stats, refine=RefineRequest(steps=5)))
