"""`kvconvert heal` and `kvconvert matryoshka` / `eval --cache matryoshka:DIR` used as a user would: reproducible
LoRA heals, what --resume refuses, what a healed record inherits, one-line errors, inputs left untouched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from kvconvert.cli import _register, app
from kvconvert.errors import KVConvertError
from kvconvert.heal import HealRequest, run_heal
from kvconvert.record import dump_record, read_record

_register()
runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def request(student, teacher, text, output, **kw):
    base = dict(datasets=[str(text)], steps=4, seq_len=32, batch_size=2, lr=1e-3, checkpoint_every=2, device="cpu")
    return HealRequest(str(student), str(teacher), output, **(base | kw))


class Interrupted(Exception):
    pass


def interrupt_at(step):
    def on_step(info, model):
        if info.step == step:
            raise Interrupted

    return on_step


def test_lora_heal_is_reproducible_and_a_resumed_lora_run_matches_an_uninterrupted_one(
    student, tiny_llama, text_a, tmp_path
):
    """docs/heal.md: on CPU a resumed run is bit-identical to an uninterrupted one; docs/reliability.md: the same
    inputs and seed give byte-identical outputs. The LoRA adapters were initialised from the unseeded global RNG."""
    run_heal(request(student, tiny_llama, text_a, tmp_path / "a", train="lora"))
    run_heal(request(student, tiny_llama, text_a, tmp_path / "b", train="lora"))
    with pytest.raises(Interrupted):
        run_heal(request(student, tiny_llama, text_a, tmp_path / "r", train="lora"), on_step=interrupt_at(3))
    resumed = run_heal(request(student, tiny_llama, text_a, tmp_path / "r", train="lora", resume=True))
    assert resumed.record.heal.resumed_from_step == 2
    a, b, r = (load_file(tmp_path / n / "model.safetensors") for n in ("a", "b", "r"))
    assert all(torch.equal(a[k], b[k]) for k in a), "two identical --train lora runs wrote different weights"
    assert all(torch.equal(a[k], r[k]) for k in a), "the resumed --train lora run differs from the uninterrupted one"


def test_resume_refuses_another_seq_len_or_dtype(student, tiny_llama, text_a, tmp_path):
    """docs/heal.md: --resume refuses if any setting that changes the result differs. Another --seq-len was
    accepted (training went on with the saved 32-token windows while the record said 64) and so was another
    --dtype (bf16 autocast instead of float32)."""
    out = tmp_path / "o"
    with pytest.raises(Interrupted):
        run_heal(request(student, tiny_llama, text_a, out), on_step=interrupt_at(3))
    with pytest.raises(KVConvertError, match="seq_len"):
        run_heal(request(student, tiny_llama, text_a, out, resume=True, seq_len=64))
    with pytest.raises(KVConvertError, match="precision"):
        run_heal(request(student, tiny_llama, text_a, out, resume=True, dtype="bfloat16"))
    healed = run_heal(request(student, tiny_llama, text_a, out, resume=True)).record.heal
    assert healed.resumed_from_step == 2 and healed.tokens == healed.steps * healed.global_batch_size * healed.seq_len


def test_healed_output_does_not_carry_the_students_perplexity(student, tiny_llama, text_a, text_b, tmp_path):
    """`kvconvert eval STUDENT --baseline ORIGINAL` records the student's perplexity in its kvconvert.json and card;
    healing that student copied it into the healed model's record and card (and its model-index), as if measured
    on the healed weights. So were its Hub upload and its MatryoshkaKV section (whose file heal does not copy)."""
    evaluated = tmp_path / "student"
    shutil.copytree(student, evaluated)
    args = ["eval", str(evaluated), "--baseline", str(tiny_llama), "--dataset", str(text_b)]
    r = runner.invoke(app, [*args, "--samples", "2", "--seq-len", "32", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    before = json.loads((evaluated / "kvconvert.json").read_text())["evaluation"]["perplexity"]["after"]
    record = read_record(evaluated).with_sections(hub={"repo_id": "me/student"}, matryoshka={"budget": 0.5})
    (evaluated / "kvconvert.json").write_text(dump_record(record))
    out = tmp_path / "healed"
    run_heal(request(evaluated, tiny_llama, text_a, out, steps=20, lr=3e-3))
    record = json.loads((out / "kvconvert.json").read_text())
    assert "heal" in record
    assert "evaluation" not in record, f"the healed record claims the student's perplexity {before}"
    assert "hub" not in record and "matryoshka" not in record, record
    assert record["calibration"] == read_record(evaluated).data()["calibration"]  # what made the student stays
    assert f"{before:.2f}" not in (out / "README.md").read_text()


def cli(*args):
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "kvconvert", "--threads", "1", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


MATRYOSHKA = ("--budget", "0.5", "--samples", "4", "--heldout", "1", "--seq-len", "16", "--steps", "0")


def test_eval_cache_with_projections_of_another_model_is_one_line(student, tiny_llama, text_a, text_b, tmp_path):
    """Projections made on the original (4 KV heads) given to the merged model (1 KV head): a ValueError traceback,
    not the one-line `kvconvert: error: ...` with exit code 2."""
    proj = tmp_path / "m"
    r = cli("matryoshka", tiny_llama, "--dataset", text_a, *MATRYOSHKA, "--device", "cpu", "-o", proj)
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("eval", student, "--cache", f"matryoshka:{proj}", "--dataset", text_b, "--samples", "1", "--seq-len", "16")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and r.stderr.startswith("kvconvert: error: ")
    assert len(r.stderr.strip().splitlines()) == 1 and "kvconvert matryoshka" in r.stderr


def test_matryoshka_into_its_own_model_directory_is_refused(tiny_llama, text_a, tmp_path):
    """docs/reliability.md: an existing output is replaced only with --overwrite, and an output that is the input
    checkpoint is refused. `kvconvert matryoshka M -o M` wrote into the input, and a second such run replaced its
    matryoshka.safetensors without --overwrite."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    files = {p.name: p.read_bytes() for p in model.iterdir()}
    args = ["matryoshka", str(model), "--dataset", str(text_a), *MATRYOSHKA, "--device", "cpu", "-o", str(model)]
    r = runner.invoke(app, args)
    assert r.exit_code != 0 and isinstance(r.exception, KVConvertError), r.output
    assert "overlaps the input" in str(r.exception)
    assert {p.name: p.read_bytes() for p in model.iterdir()} == files  # the input untouched


def test_heal_on_cuda_n_runs_with_gpu_n_current(monkeypatch):
    """`heal --device cuda:1` trained on cuda:0: a single-process Accelerator places everything on "cuda", the
    current device. run_heal now runs inside `torch.cuda.device(1)` (built lazily: no GPU is touched here)."""
    from kvconvert.heal.run import on_device_index

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = on_device_index(torch.device("cuda:1"))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
    assert not isinstance(on_device_index(torch.device("cuda")), torch.cuda.device)  # no index: as accelerate picks
    assert not isinstance(on_device_index(torch.device("cpu")), torch.cuda.device)
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun/accelerate launch: each process has its own GPU
    assert not isinstance(on_device_index(torch.device("cuda:1")), torch.cuda.device)
