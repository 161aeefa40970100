"""The streamed verify: exact tensors, then layer-by-layer logits, on whatever device runs them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvconvert.checkpoint import resolve
from kvconvert.converted import Converted
from kvconvert.errors import KVConvertError
from kvconvert.pipeline import CalibrationRequest, CompressRequest, run_compress
from kvconvert.stats import CalibrationStats, pack
from kvconvert.verify import converted_in_memory, layerwise_logits, verify, verify_streamed
from tests.tiny import DEVICES


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_qwen2):
    """A written tiny conversion (tied embeddings, q/k/v biases) and its in-memory counterpart (statistics of
    random inputs, so no text pipeline is needed)."""
    root = tmp_path_factory.mktemp("verify")
    ckpt = resolve(str(tiny_qwen2))
    hidden, layers = ckpt.config.hidden_size, ckpt.config.num_hidden_layers
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(64, hidden, generator=gen, dtype=torch.float64) for _ in range(layers)]
    stats = CalibrationStats(torch.stack([x.sum(0) for x in xs]), [pack(x.T @ x) for x in xs], 64, ckpt.fingerprint())
    stats.save(root / "stats.safetensors")
    req = CompressRequest(model=str(tiny_qwen2), heads="2", output=root / "out", stats=root / "stats.safetensors")
    req.calibration = CalibrationRequest(device="cpu")
    result = run_compress(req)
    assert result.verify is not None and result.verify.ok
    return root / "out", Converted(ckpt, result.plan)


@pytest.mark.parametrize("device", DEVICES)
def test_streamed_verify_passes_on_every_device(converted, device):
    out, conv = converted
    result = verify_streamed(out, conv, device)
    assert result.ok and result.max_abs_diff <= 1e-5 * max(result.logits_scale, 1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_reload_check_puts_inputs_on_the_reference_device(converted, device):
    """Issue 16: with the reference on a GPU, `verify` fed it CPU token ids and crashed."""
    out, conv = converted
    reference = converted_in_memory(conv).to(device)
    assert verify(out, reference).ok


def test_layerwise_logits_equal_the_stock_model(converted):
    from transformers import AutoModelForCausalLM

    out, conv = converted
    ids = torch.randint(0, conv.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        want = stock(ids).logits
    got = layerwise_logits(resolve(str(out)), ids, torch.device("cpu"))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_a_changed_tensor_is_caught(converted, tmp_path):
    out, conv = converted
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.bias"][0] += 1e-3
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KVConvertError, match=r"k_proj\.bias differs"):
        verify_streamed(bad, conv)


def test_a_wrong_config_is_caught(converted, tmp_path):
    out, conv = converted
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    config = json.loads((bad / "config.json").read_text()) | {"num_key_value_heads": 4}
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(KVConvertError, match="does not run with its own config"):
        verify_streamed(bad, conv)
