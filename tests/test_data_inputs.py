"""Calibration text, several processes and the GGUF cache used as a user would: `self` windows given back at their
batch size, more processes than batches, a read-only cache, table files that are empty, malformed or not UTF-8."""

from __future__ import annotations

import errno
import json
import subprocess
import sys

import pytest
import torch

from kvconvert.checkpoint import resolve
from kvconvert.errors import KVConvertError
from kvconvert.pipeline import CalibrationRequest, run_calibration, stats_windows
from kvconvert.stats import CalibrationStats
from kvconvert.textdata import iter_documents


def test_self_statistics_give_back_their_windows_at_the_default_batch_size(tmp_path, tiny_llama):
    """`calibrate --dataset self` (default --batch-size 1), then `compress --stats F --refine-steps N`: the refine
    windows are sampled again from the recorded source. They were sampled at batch size 8, which draws other
    tokens (each batch has its own seed), so the run failed with "sampled ... on cpu; sampling again on cpu gave
    other tokens"."""
    ckpt = resolve(str(tiny_llama))
    req = CalibrationRequest(dataset="self", samples=3, seq_len=8, device="cpu")
    stats = run_calibration(ckpt, req, tmp_path / "s.safetensors")
    windows = stats_windows(ckpt, stats, "cpu")
    assert windows.shape == (3, 8)


CAL = ["--samples", "1", "--seq-len", "12", "--batch-size", "1", "--device", "cpu"]


@pytest.mark.parametrize("dataset", ["text", "self"])
def test_more_processes_than_batches(tmp_path, tiny_llama, text_a, dataset):
    """torchrun --nproc_per_node 2 with one batch: rank 1 has none. It crashed (`torch.cat(): expected a non-empty
    list of Tensors`, a traceback and gloo's "Connection closed by peer"); it must give the single-process file."""
    spec = str(text_a) if dataset == "text" else "self"
    args = ["-m", "kvconvert", "--threads", "1", "calibrate", str(tiny_llama), "--dataset", spec, *CAL]
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    run = subprocess.run([sys.executable, *args, "-o", str(one)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run = subprocess.run([*torchrun, *args, "-o", str(two)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = CalibrationStats.load(one), CalibrationStats.load(two)
    assert a.n_tokens == b.n_tokens == 12 and a.source == b.source
    torch.testing.assert_close(b.sum_x, a.sum_x, rtol=1e-12, atol=1e-12)
    for layer in range(a.num_layers):
        torch.testing.assert_close(b.sum_xx(layer), a.sum_xx(layer), rtol=1e-12, atol=1e-12)


def test_a_read_only_cache_that_holds_the_expansion_is_used(tmp_path, monkeypatch):
    """A cache on a read-only mount (a shared or prebuilt one) that already holds the GGUF's expansion: the lookup
    of the file's digest took the memo's write lock first, so the run failed with `Read-only file system
    (…/gguf/.digests.json.lock)` although nothing needed writing."""
    from kvconvert import sources
    from kvconvert.io import digest
    from tests.test_cache_keys import STR, U32
    from tests.test_gguf_metadata import write_gguf

    gguf = tmp_path / "m.gguf"
    write_gguf(gguf, {"general.file_type": (U32, None, 2), "general.name": (STR, None, "m")})
    monkeypatch.setenv("KVCONVERT_CACHE", str(tmp_path / "cache"))
    built = []
    monkeypatch.setattr(sources, "locked_fill", lambda target, build: built.append(target) or target)
    filled = sources.gguf_checkpoint(gguf)  # a writable cache: the memo is written

    class ReadOnlyLock:
        def __init__(self, path):
            self.path = path

        def __enter__(self):
            raise OSError(errno.EROFS, "Read-only file system", str(self.path))

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(digest, "FileLock", ReadOnlyLock)
    assert sources.gguf_checkpoint(gguf) == filled
    (tmp_path / "cache" / "gguf" / digest.MEMO).unlink()  # no memo either: the file is hashed, nothing written
    assert sources.gguf_checkpoint(gguf) == filled
    assert not (tmp_path / "cache" / "gguf" / digest.MEMO).exists()


@pytest.fixture
def own_datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


@pytest.mark.usefixtures("own_datasets_cache")
@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("latin1.csv", b"text\ncaf\xe9 au lait\n", r"is not UTF-8 text \(byte 8\); convert it to UTF-8"),
        ("latin1.jsonl", b'{"text": "caf\xe9"}\n', r"is not UTF-8 text \(byte 13\); convert it to UTF-8"),
        ("broken.jsonl", b'{"text": "ok"}\n{"text": broken\n', r"cannot read dataset file .* as json \(JSON parse"),
        ("broken.parquet", b"not parquet\n", r"cannot read dataset file .* as parquet \(Parquet magic bytes"),
    ],
)
def test_an_unreadable_table_file_is_one_error(tmp_path, name, content, message):
    """A local table that `datasets` cannot read was a traceback (`DatasetGenerationError: An error occurred while
    generating the dataset`, a pyarrow error, a UnicodeDecodeError), exit code 1; a `.txt` says it in one line."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(KVConvertError, match=message):
        list(iter_documents(str(path)))


@pytest.mark.usefixtures("own_datasets_cache")
@pytest.mark.parametrize(
    ("name", "content"), [("e.jsonl", ""), ("b.jsonl", "\n\n"), ("e.csv", ""), ("h.csv", "text\n")]
)
def test_an_empty_table_file_has_no_documents(tmp_path, name, content):
    """An empty table (or a csv with only its header) was `RuntimeError: generator raised StopIteration`,
    `pandas.errors.EmptyDataError` or `Instruction "train" corresponds to no data!`; like an empty `.txt` it has no
    documents, so calibration says `has 0 tokens, N needed`."""
    path = tmp_path / name
    path.write_text(content)
    assert list(iter_documents(str(path))) == []


def test_an_unreadable_table_is_one_line_from_the_cli(tmp_path, tiny_llama):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(json.dumps({"text": "ok"}).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvconvert",
            "--threads",
            "1",
            "calibrate",
            str(tiny_llama),
            "--dataset",
            str(path),
            *CAL,
            "-o",
            str(tmp_path / "s.safetensors"),
        ],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "HF_DATASETS_CACHE": str(tmp_path / "hf")},
    )
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        f"kvconvert: error: dataset file {path} is not UTF-8 text (byte 28); convert it to UTF-8"
    ], run.stderr


def test_the_cards_reproduce_command_samples_the_same_self_windows(tmp_path, tiny_llama):
    """A `--dataset self` conversion at --batch-size 2: the card's Reproduce command left the batch size out, and
    at the default (1) every window is drawn with another seed, so the command made another model."""
    from kvconvert.pipeline import CompressRequest, run_compress

    out = tmp_path / "conv"
    cal = CalibrationRequest(dataset="self", samples=2, seq_len=16, batch_size=2, device="cpu")
    run_compress(CompressRequest(str(tiny_llama), "1", out, calibration=cal))
    command = next(line for line in (out / "README.md").read_text().splitlines() if "kvconvert compress" in line)
    assert "--dataset self" in command and "--batch-size 2" in command
