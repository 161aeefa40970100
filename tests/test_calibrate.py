"""Calibration statistics: correct sums, file round trip, fingerprint checks."""

import pytest
import torch

from kvconvert.calibrate import accumulate
from kvconvert.checkpoint import resolve
from kvconvert.errors import KVConvertError
from kvconvert.modeling import load_model, load_tokenizer
from kvconvert.pipeline import CalibrationRequest, run_calibration
from kvconvert.stats import CalibrationStats, pack, unpack
from kvconvert.textdata import iter_texts, token_windows
from tests.tiny import make_model


def test_sums_equal_normed_hidden_states(tiny_llama):
    ckpt = resolve(str(tiny_llama))
    model = load_model(ckpt, torch.device("cpu"), torch.float32)
    windows = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(0))
    sum_x, sum_xx, n = accumulate(model, ckpt.family, windows, batch_size=2)
    hidden = model(windows, output_hidden_states=True).hidden_states
    assert n == 60
    for layer, block in enumerate(model.model.layers):
        x = block.input_layernorm(hidden[layer]).reshape(-1, 128).double()
        torch.testing.assert_close(sum_xx[layer], x.T @ x, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sum_x[layer], x.sum(0), rtol=1e-5, atol=1e-6)


def test_windows_from_a_local_file(tiny_llama, text_a):
    tok = load_tokenizer(resolve(str(tiny_llama)))
    windows = token_windows(tok, iter_texts(str(text_a)), 4, 64, "a")
    assert windows.shape == (4, 64) and (windows[:, 0] == tok.bos_token_id).all()


def test_too_short_text_is_a_clear_error(tiny_llama, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Cache head.")
    tok = load_tokenizer(resolve(str(tiny_llama)))
    with pytest.raises(KVConvertError, match="lower --samples"):
        token_windows(tok, iter_texts(str(short)), 4, 64, str(short))


def test_stats_file_round_trip_and_fingerprint(tmp_path, tiny_llama, text_a):
    ckpt = resolve(str(tiny_llama))
    stats = run_calibration(ckpt, CalibrationRequest(str(text_a), 2, 32, device="cpu"))
    path = tmp_path / "s.safetensors"
    stats.save(path)
    loaded = CalibrationStats.load(path)
    assert torch.equal(loaded.sum_xx, stats.sum_xx) and loaded.n_tokens == 64
    assert loaded.source["dataset"] == str(text_a) and loaded.fingerprint == ckpt.fingerprint()
    loaded.check_model(ckpt.fingerprint())
    other = resolve(str(make_model(tmp_path / "other", "llama", seed=1)))
    with pytest.raises(KVConvertError, match="another model"):
        loaded.check_model(other.fingerprint())


def test_pack_unpack():
    a = torch.randn(7, 7, dtype=torch.float64)
    sym = a + a.T
    assert torch.equal(unpack(pack(sym), 7), sym)


def test_two_calibrations_add_up(tiny_llama, text_a):
    ckpt = resolve(str(tiny_llama))
    model = load_model(ckpt, torch.device("cpu"), torch.float32)
    windows = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(1))
    whole = accumulate(model, ckpt.family, windows, 4)
    halves = [accumulate(model, ckpt.family, w, 4) for w in (windows[:2], windows[2:])]
    torch.testing.assert_close(halves[0][1] + halves[1][1], whole[1])
