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
