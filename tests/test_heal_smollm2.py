"""Healing the real SmolLM2-135M-Instruct 3 -> 1 KV heads: a few steps on pydoc-a lower perplexity on pydoc-b."""

import pytest
import torch

from bench.corpora import pydoc_split
from kvconvert.checkpoint import resolve
from kvconvert.evaluation.perplexity import perplexity
from kvconvert.heal import HealRequest, run_heal
from kvconvert.modeling import load_model, load_tokenizer
from kvconvert.pipeline import CalibrationRequest, CompressRequest, run_compress
from kvconvert.textdata import iter_texts, token_windows

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")


def test_a_short_heal_of_smollm2_lowers_held_out_perplexity(tmp_path):
    pydoc_a, pydoc_b = pydoc_split(tmp_path / "text")
    held_out = token_windows(load_tokenizer(resolve("smollm2")), iter_texts(str(pydoc_b)), 4, 256, "pydoc-b")
    merged = tmp_path / "merged"
    cal = CalibrationRequest(dataset=str(pydoc_a), samples=8, seq_len=256, batch_size=4, device="cpu")
    run_compress(CompressRequest("smollm2", "1", merged, calibration=cal, verify=False))
    # the card names the model the alias stands for, not the alias
    card = (merged / "README.md").read_text()
    assert "# SmolLM2-135M-Instruct with 1 KV head\n" in card
    assert "`HuggingFaceTB/SmolLM2-135M-Instruct` (as `smollm2`) converted by" in card
    before = perplexity(load_model(resolve(str(merged)), CPU, torch.float32), held_out, 4)
    req = HealRequest(str(merged), "smollm2", tmp_path / "healed", datasets=[str(pydoc_a)], steps=4, seq_len=256)
    req.batch_size, req.lr, req.device = 2, 3e-4, "cpu"
    result = run_heal(req)
    assert result.verify.ok and result.record.heal.tokens == 2048
    after = perplexity(load_model(resolve(str(tmp_path / "healed")), CPU, torch.float32), held_out, 4)
    assert after < 0.75 * before, (before, after)
