from __future__ import annotations

import pytest

from tests.tiny import make_model, write_text


@pytest.fixture(scope="session")
def text_a(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text") / "a.txt", seed=1)


@pytest.fixture(scope="session")
def text_b(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text") / "b.txt", seed=2)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("qwen2"), "qwen2", tied=True)


@pytest.fixture(scope="session")
def student(tiny_llama, text_a, tmp_path_factory):
    """tiny_llama merged from 4 to 1 KV head (mean pooling): the model the heal tests heal."""
    from kvconvert.pipeline import CalibrationRequest, CompressRequest, run_compress

    out = tmp_path_factory.mktemp("student") / "s"
    cal = CalibrationRequest(dataset=str(text_a), samples=4, seq_len=32, batch_size=4, device="cpu")
    run_compress(CompressRequest(str(tiny_llama), "1", out, method="mean", calibration=cal))
    return out


@pytest.fixture(scope="session")
def tiny_llama_2kv(tiny_llama, text_a, tmp_path_factory):
    """tiny_llama merged from 4 to 2 KV heads on text_a, as `kvconvert compress` writes it (copy it to change it)."""
    from kvconvert.pipeline import CalibrationRequest, CompressRequest, run_compress

    out = tmp_path_factory.mktemp("tiny-2kv") / "tiny-2kv"
    cal = CalibrationRequest(dataset=str(text_a), samples=4, seq_len=32, batch_size=4, device="cpu")
    run_compress(CompressRequest(str(tiny_llama), "2", out, calibration=cal))
    return out
