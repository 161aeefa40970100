"""Retrieval-head profiling: the echo/induction arithmetic, selection, and the profile stored with a checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from kvconvert.cli import _register, app
from kvconvert.razor.profile import Probe, ProfileSettings, jaccard, probe_sequence, select

_register()
runner = CliRunner()


def test_probe_scores_a_pure_induction_and_a_pure_echo_head():
    """Head 0 attends only to the token after the previous copy, head 1 only to the previous copy."""
    block, prefix, repeats = 6, 2, 3
    length = prefix + block * repeats
    key = torch.eye(length)[None, None]  # one key direction per position
    qpos = torch.arange(prefix + block, length)
    query = torch.zeros(1, 2, length, length)
    query[0, 0, qpos, qpos - block + 1] = 60.0
    query[0, 1, qpos, qpos - block] = 60.0
    probe = Probe(qpos, block, prefix)
    probe.record(0, query, key, scaling=1.0)
    echo, induction = probe.scores[0]
    assert torch.allclose(induction, torch.tensor([1.0, 0.0]), atol=1e-4)
    assert torch.allclose(echo, torch.tensor([0.0, 1.0]), atol=1e-4)


def test_probe_sequence_repeats_a_mid_vocabulary_block():
    s = ProfileSettings(block=10, repeats=3, prefix=4)
    ids = probe_sequence(1000, s, seed=0)[0]
    assert ids.shape == (34,) and bool((ids >= 250).all() and (ids < 750).all())
    assert torch.equal(ids[4:14], ids[14:24]) and torch.equal(ids[4:14], ids[24:34])


def test_select_takes_top_fractions_among_eligible():
    induction = torch.tensor([[0.9, 0.1], [0.5, 0.8], [0.0, 0.95]])
    echo = torch.tensor([[0.0, 0.7], [0.0, 0.0], [0.9, 0.0]])
    eligible = torch.tensor([[True, True], [True, True], [False, False]])
    s = ProfileSettings(induction_fraction=0.5, echo_fraction=0.25)
    chosen = select(echo, induction, s, eligible)
    assert chosen.tolist() == [[True, True], [False, True], [False, False]]
    assert jaccard(chosen, chosen) == 1.0


def test_profile_cli_attach_keeps_stock_loading(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM

    from kvconvert.runtime import runtime_for

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_llama, ckpt)
    out = tmp_path / "profile.json"
    args = ["profile", str(ckpt), "-o", str(out), "--block", "32", "--seeds", "2", "--induction", "0.25", "--attach"]
    args += ["--scoring", "echo-induction"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    profile = json.loads(out.read_text())
    n = sum(map(len, profile["retrieval"]))
    assert len(profile["retrieval"]) == 2 and 2 <= n <= 3  # ceil(0.25 * 8) by induction, ceil(0.01 * 8) by echo
    assert 0 <= profile["stability"]["jaccard_min"] <= 1
    assert json.loads((ckpt / "config.json").read_text())["kvconvert_razor"]["retrieval"] == profile["retrieval"]
    assert json.loads((ckpt / "kvconvert.json").read_text())["razor_profile"]["echo"] == profile["echo"]
    model = AutoModelForCausalLM.from_pretrained(ckpt)  # stock loading still works
    for spec in ("razor", f"razor:{out}", f"razor:{ckpt}"):
        rt = runtime_for(spec, model)
        assert [list(r) for r in rt.policy.retrieval] == profile["retrieval"]


def test_protect_retrieval_keeps_retrieval_heads_apart(tmp_path, tiny_llama, text_a):
    """Protect the pairs the unprotected search merges: the protected search must split every one of them."""
    from kvconvert.pipeline import CalibrationRequest, CompressRequest, run_compress
    from kvconvert.razor.store import SCHEMA

    calibration = CalibrationRequest(
        dataset=str(text_a), samples=4, seq_len=32, batch_size=2, device="cpu", dtype="float32"
    )

    def plan(protect=None, name="a"):
        req = CompressRequest(str(tiny_llama), "2", tmp_path / name, calibration=calibration, verify=False)
        req.protect_retrieval = protect
        return run_compress(req).plan

    pairs = [sorted(layer.heads[0].kv_heads) for layer in plan().layers]
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"schema": SCHEMA, "retrieval": pairs}))
    for layer, pair in zip(plan(profile, "b").layers, pairs, strict=True):
        assert all(not set(pair) <= set(head.kv_heads) for head in layer.heads)


def test_eval_cache_reports_held_bytes_equal_to_computed(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvconvert.evaluation.cached import evaluate_cache
    from kvconvert.razor.store import SCHEMA

    profile = tmp_path / "p.json"
    runtime = {"sinks": 2, "window_floor": 16, "window_fraction": 0.0, "compensation": True}
    profile.write_text(json.dumps({"schema": SCHEMA, "retrieval": [[0], [1, 2]], "runtime": runtime}))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    windows = torch.randint(5, 300, (2, 64), generator=torch.Generator().manual_seed(0))
    report = evaluate_cache(model, tok, f"razor:{profile}", windows, [120], chunk=32, new_tokens=4)
    razor = report["methods"][f"razor:{profile}"]
    assert razor["contexts"]["120"]["cache_bytes"] == razor["contexts"]["120"]["computed_bytes"]
    assert razor["contexts"]["120"]["cache_bytes"] < report["methods"]["full"]["contexts"]["120"]["cache_bytes"]
    assert razor["perplexity"] != report["methods"]["full"]["perplexity"]  # the window (16) is shorter than 64


class _Steps:
    """A Progress that records each task's total and how far it was advanced."""

    def __init__(self):
        self.tasks: dict[str, list[int | None]] = {}

    def task(self, description, total):
        self.tasks[description] = [total, 0]

        def advance(n=1, info=None):
            self.tasks[description][1] += n

        return advance

    def log(self, message):
        pass


def test_eval_cache_cli_prints_a_table_or_json_and_reports_progress(tmp_path, tiny_llama, text_b):
    """`eval --cache` shows a table (JSON only with --json), and each cache's bar runs to its total."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvconvert.evaluation.cached import evaluate_cache
    from kvconvert.razor.store import SCHEMA

    profile = tmp_path / "p.json"
    runtime = {"sinks": 2, "window_floor": 16, "window_fraction": 0.0, "compensation": True}
    profile.write_text(json.dumps({"schema": SCHEMA, "retrieval": [[0], [1, 2]], "runtime": runtime}))
    base = ["eval", str(tiny_llama), "--cache", f"razor:{profile}", "--dataset", str(text_b), "--samples", "2"]
    base += ["--seq-len", "32", "--contexts", "48", "--new-tokens", "2"]
    table = runner.invoke(app, base)
    assert table.exit_code == 0, table.output
    assert "vs full" in table.stdout and "100.0%" in table.stdout and not table.stdout.lstrip().startswith("{")
    as_json = runner.invoke(app, [*base, "--json"])
    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.stdout)
    assert set(report["methods"]) == {"full", f"razor:{profile}"}

    steps = _Steps()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    windows = torch.randint(5, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    evaluate_cache(
        model, AutoTokenizer.from_pretrained(tiny_llama), f"razor:{profile}", windows, [48], 16, 2, 0.5, steps
    )
    assert steps.tasks == {"eval full": [2 + 7, 2 + 7], f"eval razor:{profile}": [2 + 7, 2 + 7]}


def test_recipe_profile_section():
    from kvconvert.recipe import Recipe

    r = Recipe.model_validate({"model": "m", "output": "o", "compress": {"heads": 1}, "profile": {"block": 256}})
    assert r.profile.block == 256 and r.profile.induction == 0.14
    assert Recipe.model_validate({"model": "m", "output": "o", "compress": {"heads": 1}}).profile is None


def test_profile_never_replaces_a_file_it_was_not_told_to(tmp_path, tiny_llama):
    """An existing --output is replaced only with --overwrite, and a file of the model never (one stderr line)."""
    import subprocess
    import sys

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_llama, ckpt)
    out = tmp_path / "profile.json"
    out.write_text("mine\n")
    base = [
        sys.executable,
        "-m",
        "kvconvert",
        "profile",
        str(ckpt),
        "--block",
        "32",
        "--seeds",
        "1",
        "--scoring",
        "echo-induction",
    ]
    r = subprocess.run([*base, "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--overwrite" in r.stderr
    assert out.read_text() == "mine\n"
    weights = (ckpt / "model.safetensors").read_bytes()
    r = subprocess.run([*base, "-o", str(ckpt / "model.safetensors"), "--overwrite"], capture_output=True, text=True)
    assert r.returncode == 2 and "overlaps the input" in r.stderr
    assert (ckpt / "model.safetensors").read_bytes() == weights
    r = subprocess.run([*base, "-o", str(out), "--overwrite"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (
        json.loads(out.read_text())["num_kv_heads"]
        == json.loads((ckpt / "config.json").read_text())["num_key_value_heads"]
    )


def test_eval_cache_scores_the_continuation_after_a_prompt(tmp_path, tiny_llama):
    """prompt_fraction: each window's first half is read at once as a prompt, only the rest is scored (the full
    row equals the stock model's loss on those positions), and razor differs there (the window is 8 tokens)."""
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvconvert.evaluation.cached import evaluate_cache
    from kvconvert.razor.store import SCHEMA

    profile = tmp_path / "p.json"
    runtime = {"sinks": 2, "window_floor": 8, "window_fraction": 0.0, "prompt_attention": "full"}
    profile.write_text(json.dumps({"schema": SCHEMA, "retrieval": [[0], []], "runtime": runtime}))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    windows = torch.randint(5, 300, (2, 64), generator=torch.Generator().manual_seed(1))
    spec = f"razor:{profile}"
    report = evaluate_cache(model, tok, spec, windows, [], chunk=16, prompt_fraction=0.5)
    assert report["prompt_tokens"] == 32
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        logits = model(windows).logits
    ce = torch.nn.functional.cross_entropy(logits[:, 32:-1].flatten(0, 1), windows[:, 33:].flatten())
    assert report["methods"]["full"]["perplexity"] == pytest.approx(math.exp(float(ce)), rel=1e-4)
    assert abs(report["methods"][spec]["perplexity"] - report["methods"]["full"]["perplexity"]) > 1e-3
