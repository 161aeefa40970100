"""Real-model checks on SmolLM2-135M-Instruct (9 query / 3 KV heads), the built-in offline model."""

import pytest
import torch

from bench.corpora import pydoc_split
from kvconvert.checkpoint import resolve
from kvconvert.converted import Converted
from kvconvert.evaluation.perplexity import perplexity
from kvconvert.expand import expand_to_mha
from kvconvert.modeling import load_model, load_tokenizer
from kvconvert.pipeline import CalibrationRequest, CompressRequest, plan_compression, run_calibration, run_compress
from kvconvert.textdata import iter_texts, token_windows
from kvconvert.verify import converted_in_memory

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def smollm2():
    return resolve("smollm2")


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    return pydoc_split(tmp_path_factory.mktemp("pydoc"))


@pytest.fixture(scope="module")
def held_out(smollm2, texts):
    return token_windows(load_tokenizer(smollm2), iter_texts(str(texts[1])), 8, 256, "pydoc-b")


def test_expanded_and_shuffled_model_merges_back_within_half_a_percent(smollm2, texts, held_out, tmp_path):
    original = perplexity(load_model(smollm2, CPU, torch.float32), held_out, 4)
    mha = expand_to_mha(smollm2, tmp_path / "mha", seed=0)
    assert resolve(str(mha)).config.num_key_value_heads == 9
    out = tmp_path / "back"
    cal = CalibrationRequest(dataset=str(texts[0]), samples=8, seq_len=256, batch_size=4, device="cpu")
    result = run_compress(CompressRequest(str(mha), "3", out, calibration=cal))
    assert result.verify.ok
    merged = perplexity(load_model(resolve(str(out)), CPU, torch.float32), held_out, 4)
    assert abs(merged / original - 1) < 0.005, (original, merged)


def test_weighted_beats_svd_beats_mean_at_one_kv_head(smollm2, texts, held_out, tmp_path):
    stats = run_calibration(
        smollm2,
        CalibrationRequest(dataset=str(texts[0]), samples=16, seq_len=256, batch_size=4, device="cpu"),
        tmp_path / "stats.safetensors",
    )
    ppl = {}
    for method in ("mean", "svd", "weighted"):
        plan = plan_compression(smollm2, stats, 1, method, "search", CPU)
        ppl[method] = perplexity(converted_in_memory(Converted(smollm2, plan)), held_out, 4)
    assert ppl["weighted"] < 0.85 * ppl["svd"] and ppl["svd"] < 0.1 * ppl["mean"], ppl
