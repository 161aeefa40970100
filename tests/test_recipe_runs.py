"""`kvconvert run`, `eval` and the model card used as a user would: overrides, dry runs, what a recipe passes on to
heal, reused statistics, and what eval records."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from kvconvert.card import CARD, record_evaluation, update_record
from kvconvert.record import RECORD, dump_record, load_record, new_record

ROOT = Path(__file__).parent.parent
DEMO = ROOT / "recipes" / "smollm2-135m-1kv.yaml"


def cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kvconvert", "--threads", "1", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=os.environ | {"OMP_NUM_THREADS": "1"})


def tiny_recipe(tmp_path: Path, model: Path, text_a: Path, text_b: Path, **sections) -> dict:
    recipe = {
        "model": str(model),
        "output": str(tmp_path / "out"),
        "calibrate": {"dataset": str(text_a), "samples": 4, "seq_len": 32, "device": "cpu"},
        "compress": {"heads": 2},
        "eval": {"dataset": str(text_b), "samples": 2, "seq_len": 32, "device": "cpu"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = recipe[key] | value
        else:
            recipe[key] = value
    return recipe


def write_recipe(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def one_line_error(r: subprocess.CompletedProcess, *fragments: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvconvert: error:"), r.stderr
    for fragment in fragments:
        assert fragment in lines[0], r.stderr


def test_a_set_value_that_is_not_yaml_is_no_traceback():
    # `--set` reads VALUE as YAML; a value YAML cannot parse (a leading `@`, an unclosed bracket) is a plain user
    # input, not a crash.
    r = cli("run", str(DEMO), "--dry-run", "--set", "push.repo_id=me/demo", "--set", "push.commit_message=@me: 3 -> 1")
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 0, r.stderr


def test_a_recipe_heal_section_takes_a_text_field():
    # `kvconvert heal --text-field COL` exists; a recipe's heal section refused the key as unknown.
    from kvconvert.recipe import load_recipe
    from kvconvert.workflow import heal_request

    recipe = load_recipe(DEMO, ["heal.datasets=[notes.jsonl]", "heal.text_field=body"])
    assert heal_request(recipe).text_field == "body"


def test_dry_run_lists_every_step_the_run_takes():
    # `--dry-run`: "Validate the recipe and print its steps"; the matryoshka and profile sections run too.
    r = cli(
        "run",
        str(DEMO),
        "--dry-run",
        "--json",
        "--set",
        "matryoshka.datasets=[pydoc]",
        "--set",
        "profile.scoring=ablation",
    )
    assert r.returncode == 0, r.stderr
    steps = json.loads(r.stdout)["steps"]
    assert any("matryoshka" in s for s in steps), steps
    assert any("profile" in s for s in steps), steps


def test_a_recipe_that_heals_keeps_the_compress_shard_size(tmp_path, tiny_llama, text_a, text_b):
    # compress.max_shard_size shards the output; the heal section rewrites the output in place and must keep it
    # (`compress --max-shard-size S --heal-tokens N` does).
    recipe = tiny_recipe(
        tmp_path,
        tiny_llama,
        text_a,
        text_b,
        compress={"max_shard_size": "200KB"},
        heal={"datasets": [str(text_a)], "steps": 1, "seq_len": 32, "device": "cpu"},
    )
    r = cli("run", str(write_recipe(tmp_path, recipe)))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    assert (out / "model.safetensors.index.json").is_file(), sorted(p.name for p in out.iterdir())
    assert not (out / "model.safetensors").exists()


def test_a_recipe_with_allow_pickle_can_heal(tmp_path, tiny_llama, text_a, text_b):
    # allow_pickle: true lets the recipe read a pytorch_model.bin checkpoint; the heal section reads the same model
    # as its teacher and must not then fail with "pass --allow-pickle" (which the recipe did pass).
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_llama, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(tiny_llama / "model.safetensors"), pickled / "pytorch_model.bin")
    recipe = tiny_recipe(
        tmp_path,
        pickled,
        text_a,
        text_b,
        allow_pickle=True,
        heal={"datasets": [str(text_a)], "steps": 1, "seq_len": 32, "device": "cpu"},
    )
    r = cli("run", str(write_recipe(tmp_path, recipe)))
    assert r.returncode == 0, r.stderr
    assert load_record(tmp_path / "out").heal.steps == 1


def test_statistics_kept_inside_the_output_are_refused_before_calibrating(tmp_path, tiny_llama, text_a, text_b):
    # calibrate.stats inside the output directory: the run calibrated, then refused its own output as "not empty"
    # (and with overwrite the statistics went away with the old output). A cheap check: refuse it first.
    out = tmp_path / "out"
    recipe = tiny_recipe(tmp_path, tiny_llama, text_a, text_b, calibrate={"stats": str(out / "stats.safetensors")})
    r = cli("run", str(write_recipe(tmp_path, recipe)))
    one_line_error(r, "calibrate.stats")
    assert not out.exists() or not any(out.iterdir())  # nothing calibrated, nothing written


def fake_report(ppl_after: float, ppl_before: float | None, sha: str = "ab" * 32) -> dict:
    report = {
        "dataset": "pydoc-test",
        "samples": 2,
        "seq_len": 32,
        "seed": 1,
        "dtype": "float32",
        "tokens_sha256": sha,
        "model": {"perplexity": ppl_after},
    }
    if ppl_before is not None:
        report["baseline"] = {"perplexity": ppl_before}
    return report


def test_eval_of_a_folder_without_a_card_does_not_say_the_card_was_edited_by_hand(tmp_path):
    # `kvconvert profile MODEL --attach` (or `heal` of a plain checkpoint) leaves a kvconvert.json that has no card;
    # `eval MODEL` then said "README.md was edited by hand, so it was left as it is" about a file that is not there.
    (tmp_path / RECORD).write_text(dump_record(new_record(razor_profile={"schema": "x"})))
    said = record_evaluation(str(tmp_path), fake_report(12.0, None), None)
    assert said is not None and "edited by hand" not in said, said
    assert not (tmp_path / CARD).exists()


def test_eval_without_a_baseline_keeps_the_baseline_measured_on_the_same_tokens(tiny_llama_2kv, tmp_path):
    # `kvconvert run` measured before -> after; a later `kvconvert eval OUT` on the same tokens (same sha256) without
    # --baseline turned the card's "original" perplexity into "not measured".
    out = tmp_path / "out"
    shutil.copytree(tiny_llama_2kv, out)
    record_evaluation(str(out), fake_report(30.0, 20.0), "base")
    record_evaluation(str(out), fake_report(30.0, None), None)
    ev = load_record(out).evaluation
    assert ev.perplexity.before == 20.0 and ev.perplexity.after == 30.0
    assert "not measured" not in (out / CARD).read_text()
    # other tokens: the old baseline number does not apply and is not kept
    record_evaluation(str(out), fake_report(31.0, None, sha="cd" * 32), None)
    assert load_record(out).evaluation.perplexity.before is None
    update_record(out)  # still reads


def test_statistics_of_text_that_changed_since_are_not_reused(tmp_path, tiny_llama, text_a, text_b):
    # calibrate.stats is "reused if it matches": the same dataset path, but the file now holds other text. The
    # statistics were reused and the card named the new file's sha256 as the calibration text.
    text = tmp_path / "cal.txt"
    shutil.copy(text_a, text)
    stats = tmp_path / "stats.safetensors"
    recipe = tiny_recipe(tmp_path, tiny_llama, text, text_b, calibrate={"dataset": str(text), "stats": str(stats)})
    path = write_recipe(tmp_path, recipe)
    assert cli("run", str(path)).returncode == 0
    shutil.copy(text_b, text)  # the calibration text changed
    again = cli("run", str(path), "--set", "overwrite=true")
    one_line_error(again, str(stats))
    assert "reusing calibration statistics" not in again.stdout + again.stderr
