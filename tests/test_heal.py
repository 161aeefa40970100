"""Healing: a step lowers the KL, resume reproduces an uninterrupted run, two CPU processes match one, stock output."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from kvconvert.checkpoint import resolve
from kvconvert.cli import _register, app
from kvconvert.errors import KVConvertError
from kvconvert.heal import HealRequest, run_heal
from kvconvert.heal.data import text_windows, window_order
from kvconvert.heal.loop import TrainConfig, train
from kvconvert.heal.objective import Objective, kl_divergence
from kvconvert.heal.trainable import merged, select_trainable
from kvconvert.modeling import load_tokenizer
from kvconvert.pipeline import CalibrationRequest, CompressRequest, run_compress
from kvconvert.textdata import iter_texts

_register()
runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def kl(model, teacher, windows):
    return float(kl_divergence(model(input_ids=windows).logits, teacher(input_ids=windows).logits))


def request(student, teacher, text, output, **kw):
    base = dict(datasets=[str(text)], steps=6, seq_len=32, batch_size=2, lr=1e-3, checkpoint_every=2, device="cpu")
    return HealRequest(str(student), str(teacher), output, **(base | kw))


@pytest.mark.parametrize("mode", ["attn", "all", "lora"])
def test_one_heal_step_lowers_the_kl(student, tiny_llama, text_a, tmp_path, mode):
    from accelerate import Accelerator

    teacher, model = load(tiny_llama), load(student)
    windows = text_windows(load_tokenizer(str(student)), iter_texts(str(text_a)), 32, 4)
    before = kl(model, teacher, windows)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    model = select_trainable(model, resolve(str(student)).family, mode)
    cfg = TrainConfig(steps=1, batch_size=4, lr=1e-3, warmup=0.0)
    result = train(model, teacher, windows, Objective(), cfg, Accelerator(cpu=True), state_dir=tmp_path, settings={})
    healed = merged(result.model).eval()
    after = kl(healed, teacher, windows)
    assert after < 0.99 * before, (before, after)
    changed = {n for n, p in healed.named_parameters() if not torch.equal(p, original[n])}
    assert set(dict(healed.named_parameters())) == set(original)  # LoRA merged back: the student's parameters only
    assert "model.embed_tokens.weight" not in changed and "model.layers.0.self_attn.k_proj.weight" in changed
    if mode == "attn":
        assert all(".self_attn." in n for n in changed)
    else:
        assert any(".mlp." in n for n in changed)


def test_resume_after_interruption_matches_an_uninterrupted_run(student, tiny_llama, text_a, tmp_path):
    full = run_heal(request(student, tiny_llama, text_a, tmp_path / "full"))
    assert full.record.heal.steps == 6 and full.verify.ok

    class Interrupted(Exception):
        pass

    def interrupt(info, model):
        if info.step == 5:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_heal(request(student, tiny_llama, text_a, tmp_path / "resumed"), on_step=interrupt)
    state = tmp_path / "resumed.heal-state"
    assert (state / "latest").is_dir() and not (tmp_path / "resumed").exists()
    with pytest.raises(KVConvertError, match="--resume"):
        run_heal(request(student, tiny_llama, text_a, tmp_path / "resumed"))
    with pytest.raises(KVConvertError, match="lr"):
        run_heal(request(student, tiny_llama, text_a, tmp_path / "resumed", lr=5e-4, resume=True))
    resumed = run_heal(request(student, tiny_llama, text_a, tmp_path / "resumed", resume=True))
    assert resumed.record.heal.resumed_from_step == 4 and not state.exists()
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    s = load_file(student / "model.safetensors")
    assert a.keys() == b.keys() == s.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-exact: same ops in the same order on restored fp32 state
    assert not torch.equal(a["model.layers.0.self_attn.k_proj.weight"], s["model.layers.0.self_attn.k_proj.weight"])


def test_cli_heal_writes_a_stock_checkpoint_with_the_converted_shapes(tiny_qwen2, text_a, tmp_path):
    from transformers import AutoModelForCausalLM

    conv = tmp_path / "conv"
    cal = CalibrationRequest(dataset=str(text_a), samples=4, seq_len=32, batch_size=4, device="cpu")
    run_compress(CompressRequest(str(tiny_qwen2), "2", conv, calibration=cal))
    out = tmp_path / "healed"
    args = ["heal", str(conv), "--teacher", str(tiny_qwen2), "--dataset", str(text_a), "--dataset", "self"]
    args += ["--tokens", "512", "--seq-len", "32", "--batch-size", "4", "--train", "lora", "--ce-weight", "0.5"]
    r = runner.invoke(app, [*args, "--device", "cpu", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "verified" in r.output and not (tmp_path / "healed.heal-state").exists()
    assert (out / "config.json").read_text() == (conv / "config.json").read_text()
    got, want = load_file(out / "model.safetensors"), load_file(conv / "model.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in got.items()} == {k: (v.shape, v.dtype) for k, v in want.items()}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_key_value_heads == 2 and model.config.tie_word_embeddings
    record = json.loads((out / "kvconvert.json").read_text())
    assert record["method"] == "weighted" and record["heal"]["train"] == "lora" and record["heal"]["tokens"] == 512
    assert [d["dataset"] for d in record["heal"]["data"]] == [str(text_a)]  # the text covered all 16 windows
    assert "healed" in (out / "README.md").read_text()
    r = runner.invoke(app, [*args, "--device", "cpu", "-o", str(out)])
    assert r.exit_code != 0 and "not empty" in str(r.exception)


def test_window_order_covers_every_window_once_per_epoch():
    seen = [i for step in range(5) for i in window_order(10, step, 4, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert seen[:10] != seen[10:20] and window_order(10, 2, 4, seed=3) == seen[8:12]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_match_one_process_with_the_same_global_batch(student, tiny_llama, text_a, tmp_path):
    one = run_heal(request(student, tiny_llama, text_a, tmp_path / "one", batch_size=2))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(free_port()), "-m", "kvconvert", "heal", str(student)]
    launch += ["--teacher", str(tiny_llama), "--dataset", str(text_a), "--steps", "6", "--seq-len", "32"]
    launch += ["--batch-size", "1", "--lr", "1e-3", "--device", "cpu", "-o", str(tmp_path / "two")]
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((tmp_path / "two" / "kvconvert.json").read_text())["heal"]
    assert record["processes"] == 2 and record["global_batch_size"] == 2
    assert record["windows_sha256"] == one.record.heal.windows_sha256
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    s = load_file(student / "model.safetensors")
    for k in a:  # gloo averages the two halves' gradients: equal up to float32 rounding (which Adam can amplify)
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    q = "model.layers.1.self_attn.q_proj.weight"
    assert (a[q] - s[q]).abs().max() > 100 * (b[q] - a[q]).abs().max()  # the runs moved far more than they differ


def test_compress_with_heal_tokens_heals_in_place(tiny_llama, text_a, tmp_path):
    out = tmp_path / "out"
    args = ["compress", str(tiny_llama), "--heads", "2", "--dataset", str(text_a), "--samples", "4"]
    args += ["--seq-len", "32", "--device", "cpu", "--heal-tokens", "256", "-o", str(out)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    record = json.loads((out / "kvconvert.json").read_text())
    assert record["num_key_value_heads"] == {"before": 4, "after": 2}
    assert record["heal"]["tokens"] == 256 and record["heal"]["teacher"] == str(tiny_llama)
    assert load(out).config.num_key_value_heads == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no state or temporary directories left


def test_bad_heal_requests_name_the_fix(student, tiny_llama, text_a, tmp_path):
    with pytest.raises(KVConvertError, match="teacher"):
        run_heal(request(student, tiny_llama, text_a, tiny_llama / "x"))
    with pytest.raises(KVConvertError, match="--overwrite"):
        run_heal(request(student, tiny_llama, text_a, student))
    with pytest.raises(KVConvertError, match="not both 0"):
        run_heal(request(student, tiny_llama, text_a, tmp_path / "o", kl_weight=0.0))


def test_bf16_mixed_precision_keeps_a_bf16_student_bf16(text_a, tmp_path):
    """The GPU recipe (bf16 teacher, fp32 master weights under bf16 autocast), run on CPU autocast."""
    from tests.tiny import make_model

    teacher = make_model(tmp_path / "bf16", "mistral", dtype=torch.bfloat16)
    conv = tmp_path / "conv"
    run_compress(
        CompressRequest(
            str(teacher),
            "2",
            conv,
            calibration=CalibrationRequest(dataset=str(text_a), samples=4, seq_len=32, batch_size=4),
        )
    )
    result = run_heal(request(conv, teacher, text_a, tmp_path / "healed", steps=2, dtype="bfloat16"))
    assert result.verify.ok and result.verify.max_abs_diff == 0.0
    got, want = load_file(tmp_path / "healed" / "model.safetensors"), load_file(conv / "model.safetensors")
    assert {v.dtype for v in got.values()} == {torch.bfloat16} and got.keys() == want.keys()
    v = "model.layers.0.self_attn.v_proj.weight"
    assert not torch.equal(got[v], want[v])


def test_teacher_samples_fill_what_the_text_lacks(tiny_llama, tmp_path):
    from kvconvert.heal.data import build_windows

    tokenizer = load_tokenizer(str(tiny_llama))
    short = tmp_path / "short.txt"
    short.write_text("key value cache merge head " * 6)
    text_only = text_windows(tokenizer, iter_texts(str(short)), 32, 100)
    n_text = len(text_only)
    assert 0 < n_text < 6
    windows, sources = build_windows(load(tiny_llama), tokenizer, [str(short), "self"], 6, 32, seed=1)
    assert windows.shape == (6, 32) and torch.equal(windows[:n_text], text_only)
    assert sources[0] == {"dataset": str(short), "windows": n_text}
    assert sources[1] == {"dataset": "self", "windows": 6 - n_text, "seed": 1}
    assert (windows[:, 0] == tokenizer.bos_token_id).all()
    with pytest.raises(KVConvertError, match="fewer than"):
        build_windows(None, tokenizer, [str(short)], 2, 10_000)


def test_windows_kept_with_keep_state_feed_a_later_heal(student, tiny_llama, text_a, tmp_path):
    """docs/heal.md: the `windows.safetensors` of a run kept with --keep-state is a --dataset of a later run (the
    same windows, in order); another --seq-len or a missing file is one clear error."""
    from kvconvert.heal.data import build_windows

    run_heal(request(student, tiny_llama, text_a, tmp_path / "first", steps=2, keep_state=True))
    saved = tmp_path / "first.heal-state" / "windows.safetensors"
    tokenizer = load_tokenizer(str(tiny_llama))
    want = text_windows(tokenizer, iter_texts(str(text_a)), 32, 10**6)
    windows, sources = build_windows(None, tokenizer, [str(saved)], 10, 32)  # it holds 2 steps x 2 windows
    assert torch.equal(windows, want[:4]) and sources == [{"dataset": str(saved), "windows": 4}]
    assert torch.equal(build_windows(None, tokenizer, [str(saved)], 3, 32)[0], want[:3])
    with pytest.raises(KVConvertError, match=r"not \(n, 64\); match --seq-len"):
        build_windows(None, tokenizer, [str(saved)], 5, 64)
    with pytest.raises(KVConvertError, match="does not exist"):
        build_windows(None, tokenizer, [str(tmp_path / "none.safetensors")], 5, 32)
