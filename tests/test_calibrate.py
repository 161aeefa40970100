"""Calibration statistics: correct sums, file round trip, fingerprint checks."""

import subprocess
import sys

import pytest
import torch

from kvconvert.calibrate import accumulate
from kvconvert.checkpoint import resolve
from kvconvert.errors import KVConvertError
from kvconvert.modeling import load_model, load_tokenizer
from kvconvert.pipeline import CalibrationRequest, run_calibration
from kvconvert.stats import CalibrationStats, pack, unpack
from kvconvert.textdata import iter_texts, sample_windows, token_windows
from tests.tiny import make_model

CPU = torch.device("cpu")


def sums(ckpt, windows, batch_size, **kwargs):
    """accumulate() collected in memory: (sum_x (L, h), [packed sum_xx per layer])."""
    xs, packed = [], []
    accumulate(
        ckpt, windows, batch_size, CPU, torch.float32, lambda _, x, p: (xs.append(x), packed.append(p)), **kwargs
    )
    return torch.stack(xs), packed


def whole_model_sums(model, windows, batch_size):
    """Reference: the stock model's hidden states, normed by each layer's input_layernorm, summed in float64."""
    n_layers = len(model.model.layers)
    hidden = model.config.hidden_size
    sum_x = torch.zeros(n_layers, hidden, dtype=torch.float64)
    sum_xx = torch.zeros(n_layers, hidden, hidden, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            states = model(windows[start : start + batch_size], output_hidden_states=True).hidden_states
            for layer, block in enumerate(model.model.layers):
                x = block.input_layernorm(states[layer]).reshape(-1, hidden).double()
                sum_xx[layer] += x.T @ x
                sum_x[layer] += x.sum(0)
    return sum_x, sum_xx


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_layer_streaming_equals_the_whole_model_path(tmp_path, family):
    ckpt = resolve(str(make_model(tmp_path / family, family, layers=3)))
    model = load_model(ckpt, CPU, torch.float32)
    windows = torch.randint(0, 300, (5, 20), generator=torch.Generator().manual_seed(0))
    want_x, want_xx = whole_model_sums(model, windows, 2)
    sum_x, packed = sums(ckpt, windows, 2)
    sum_xx = torch.stack([unpack(p, 128) for p in packed])
    torch.testing.assert_close(sum_xx, want_xx, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sum_x, want_x, rtol=1e-9, atol=1e-9)
    on_disk = sums(ckpt, windows, 2, offload_dir=tmp_path / "spill")
    assert all(torch.equal(a, b) for a, b in zip(on_disk[1], packed, strict=True)) and not any(
        (tmp_path / "spill").iterdir()
    )


def test_windows_from_a_local_file(tiny_llama, text_a):
    tok = load_tokenizer(resolve(str(tiny_llama)))
    windows = token_windows(tok, iter_texts(str(text_a)), 4, 64, "a")
    assert windows.shape == (4, 64) and (windows[:, 0] == tok.bos_token_id).all()


def test_a_local_text_file_reads_as_datasets_text_loader_reads_it(tmp_path, monkeypatch):
    """A .txt is read directly (no `datasets` import, no cache written), as the one document `datasets`' own
    `text` loader gives with sample_by="document": same string, so the same windows and token digest as before."""
    import datasets

    path = tmp_path / "mixed.txt"
    path.write_bytes("first line\r\nsecond – ünïcode\rthird\n\n  \n".encode())
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds-cache"))
    want = datasets.load_dataset("text", data_files=str(path), split="train", sample_by="document")["text"]
    assert list(iter_texts(str(path))) == want
    (tmp_path / "blank.txt").write_text(" \n\n")
    assert list(iter_texts(str(tmp_path / "blank.txt"))) == []
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(KVConvertError, match="not UTF-8 text"):
        list(iter_texts(str(tmp_path / "latin1.txt")))


def test_too_short_text_is_a_clear_error(tiny_llama, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Cache head.")
    tok = load_tokenizer(resolve(str(tiny_llama)))
    with pytest.raises(KVConvertError, match="lower --samples"):
        token_windows(tok, iter_texts(str(short)), 4, 64, str(short))


def test_stats_file_round_trip_and_fingerprint(tmp_path, tiny_llama, text_a):
    ckpt = resolve(str(tiny_llama))
    path = tmp_path / "s.safetensors"
    stats = run_calibration(ckpt, CalibrationRequest(dataset=str(text_a), samples=2, seq_len=32, device="cpu"), path)
    stats.save(tmp_path / "copy.safetensors")
    assert (tmp_path / "copy.safetensors").read_bytes() == path.read_bytes()
    loaded = CalibrationStats.load(path)
    assert all(torch.equal(loaded.sum_xx(i), stats.sum_xx(i)) for i in range(2)) and loaded.n_tokens == 64
    assert loaded.source["dataset"] == str(text_a) and loaded.fingerprint == ckpt.fingerprint()
    loaded.check_model(ckpt.fingerprint())
    other = resolve(str(make_model(tmp_path / "other", "llama", seed=1)))
    with pytest.raises(KVConvertError, match="another model"):
        loaded.check_model(other.fingerprint())


def test_pack_unpack():
    a = torch.randn(7, 7, dtype=torch.float64)
    sym = a + a.T
    assert torch.equal(unpack(pack(sym), 7), sym)


def test_two_calibrations_add_up(tiny_llama):
    ckpt = resolve(str(tiny_llama))
    windows = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(1))
    whole = sums(ckpt, windows, 2)
    halves = [sums(ckpt, w, 2) for w in (windows[:2], windows[2:])]
    for a, b, w in zip(halves[0][1], halves[1][1], whole[1], strict=True):
        torch.testing.assert_close(a + b, w, rtol=1e-12, atol=1e-12)


def test_two_processes_produce_the_single_process_statistics(tmp_path, tiny_llama, text_a):
    """torchrun with 2 CPU processes (gloo) splits the batches and all-reduces: same file as one process."""
    args = [
        "calibrate",
        str(tiny_llama),
        "--dataset",
        str(text_a),
        "--samples",
        "6",
        "--seq-len",
        "24",
        "--batch-size",
        "2",
        "--device",
        "cpu",
    ]
    single, double = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    run = subprocess.run([sys.executable, "-m", "kvconvert", *args, "-o", str(single)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run = subprocess.run([*torchrun, "-m", "kvconvert", *args, "-o", str(double)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 process(es)" in run.stdout
    a, b = CalibrationStats.load(single), CalibrationStats.load(double)
    assert a.n_tokens == b.n_tokens == 144 and a.source == b.source and a.fingerprint == b.fingerprint
    for layer in range(2):
        torch.testing.assert_close(b.sum_xx(layer), a.sum_xx(layer), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.sum_x, a.sum_x, rtol=1e-12, atol=1e-12)


def test_self_sampling_by_batches_matches_one_pass(tiny_llama):
    ckpt = resolve(str(tiny_llama))
    model, tok = load_model(ckpt, CPU, torch.float32), load_tokenizer(ckpt)
    whole = sample_windows(model, tok, 5, 12, 2, seed=3)
    parts = [sample_windows(model, tok, 5, 12, 2, seed=3, spans=[span]) for span in [(0, 2), (2, 4), (4, 5)]]
    assert torch.equal(torch.cat(parts), whole)


def test_layers_read_ahead_are_the_layers_loaded_and_errors_reach_the_loader(tiny_llama):
    """With prefetch the next layer is read on a thread while the current one runs; what `load` returns is the
    same, and a read that fails in the background fails the `load` of that layer."""
    from kvconvert.streaming import LayerRunner

    ckpt = resolve(tiny_llama)
    plain = LayerRunner(ckpt, CPU, torch.float32, prefetch=False)
    ahead = LayerRunner(ckpt, CPU, torch.float32)
    n = len(plain.layers)
    for layer in range(n):
        want = {k: v.clone() for k, v in plain.load(layer).state_dict().items()}
        got = ahead.load(layer).state_dict()
        assert set(ahead._ahead) == ({layer + 1} if layer + 1 < n else set())
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
        plain.free(layer)
        ahead.free(layer)
    assert not ahead._ahead

    broken = LayerRunner(ckpt, CPU, torch.float32)
    read = broken.read

    def failing(layer):
        if layer == 1:
            raise KVConvertError("shard truncated")
        return read(layer)

    broken.read = failing
    broken.load(0)
    with pytest.raises(KVConvertError, match="shard truncated"):
        broken.load(1)


def test_self_windows_sampled_on_another_device_say_so(tiny_llama):
    """`calibrate --dataset self` on a GPU, then `compress --stats F --refine-steps N` on the CPU: sampling again
    draws other tokens there; the error names the device the windows were sampled on, not a changed text."""
    from kvconvert.pipeline import stats_windows

    ckpt = resolve(str(tiny_llama))
    source = {"dataset": "self", "samples": 1, "seq_len": 8, "seed": 0, "dtype": "float32", "device": "cuda"}
    stats = CalibrationStats(torch.zeros(1), [], 8, ckpt.fingerprint(), source | {"tokens_sha256": "0" * 64})
    with pytest.raises(KVConvertError, match=r"sampled from the model \(--dataset self\) on cuda; .* on cpu"):
        stats_windows(ckpt, stats, "cpu")


def test_statistics_record_the_device_they_were_computed_on(tmp_path, tiny_llama, text_a):
    req = CalibrationRequest(dataset=str(text_a), samples=2, seq_len=16, device="cpu")
    stats = run_calibration(resolve(str(tiny_llama)), req, tmp_path / "s.safetensors")
    assert stats.source["device"] == "cpu"
