"""Recipes: every file in recipes/ validates, typos are named, and a tiny recipe runs every stage end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kvconvert.families import AttentionGeometry
from kvconvert.recipe import load_recipe
from kvconvert.targets import parse_heads
from tests.fakehub import FakeHub

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
# (query heads, KV heads) of the base models the shipped recipes name; the Hub is not reachable from tests.
SHAPES = {
    "smollm2": (9, 3),
    "meta-llama/Llama-2-7b-hf": (32, 32),
    "meta-llama/Meta-Llama-3-8B": (32, 8),
    "mistralai/Mistral-7B-v0.1": (32, 8),
    "Qwen/Qwen1.5-7B": (32, 32),
}


def test_the_shipped_recipes_cover_the_promised_conversions():
    promised = {(m, parse_heads(str(h), geometry(m))) for m, h in SHAPES_AND_HEADS}
    shipped = {(r.model, parse_heads(r.compress.heads, geometry(r.model))) for r in map(load_recipe, RECIPES)}
    assert promised <= shipped


SHAPES_AND_HEADS = [
    ("smollm2", 1),
    ("meta-llama/Llama-2-7b-hf", 16),
    ("meta-llama/Llama-2-7b-hf", 8),
    ("meta-llama/Meta-Llama-3-8B", 4),
    ("mistralai/Mistral-7B-v0.1", 4),
    ("Qwen/Qwen1.5-7B", 8),
]


def geometry(model: str) -> AttentionGeometry:
    heads, kv = SHAPES[model]
    return AttentionGeometry(
        hidden_size=64 * heads, num_layers=2, num_heads=heads, num_kv_heads=kv, head_dim=64, rotary_dim=64
    )


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_validates_and_its_head_count_is_valid(path):
    recipe = load_recipe(path)
    assert recipe.model in SHAPES, f"add {recipe.model}'s shape to SHAPES"
    assert parse_heads(recipe.compress.heads, geometry(recipe.model)) < SHAPES[recipe.model][1]
    assert not Path(recipe.output).is_absolute()


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kvconvert", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda r: r["compress"].update(hedas=r["compress"].pop("heads")),
            "unknown key compress.hedas (did you mean heads?)",
        ),
        (lambda r: r.update(modle="x"), "unknown key modle"),
        (lambda r: r["compress"].update(method="best"), "compress.method: 'best' is not one of"),
        (lambda r: r.pop("output"), "output is required"),
        (lambda r: r.update(heal={"train": "everything"}), "heal.train"),
    ],
)
def test_a_recipe_typo_is_one_line_naming_the_key(tmp_path, edit, message):
    data = yaml.safe_load(RECIPES[0].read_text())
    edit(data)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    r = cli("run", str(bad), "--dry-run")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_a_tiny_recipe_runs_calibrate_compress_heal_eval_push(tmp_path, tiny_llama, text_a, text_b):
    token = "hf_recipeTESTtoken"
    stats = tmp_path / "stats.safetensors"
    recipe = {
        "model": str(tiny_llama),
        "output": str(tmp_path / "out"),
        "calibrate": {"dataset": str(text_a), "samples": 4, "seq_len": 32, "device": "cpu", "stats": str(stats)},
        "compress": {"heads": 0.5, "refine": {"steps": 2, "samples": 2}},
        "heal": {"datasets": [str(text_a)], "steps": 2, "seq_len": 32, "device": "cpu"},
        "eval": {"dataset": str(text_b), "samples": 2, "seq_len": 32, "device": "cpu"},
        "push": {"repo_id": "tester/tiny-recipe"},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": token}
    with FakeHub(token=token) as hub:
        env["HF_ENDPOINT"] = hub.url
        r = cli("run", str(path), env=env)
        assert r.returncode == 0, r.stderr
        pushed = hub.files("tester/tiny-recipe")
        # a second run reuses the statistics; with other calibration settings it refuses them
        again = cli("run", str(path), "--set", "overwrite=true", "--set", "push=null", "--set", "heal=null", env=env)
        other = cli("run", str(path), "--set", "overwrite=true", "--set", "calibrate.samples=3", env=env)
    assert token not in r.stdout + r.stderr
    record = json.loads(pushed["kvconvert.json"])
    assert record["num_key_value_heads"] == {"before": 4, "after": 2}
    assert record["heal"]["steps"] == 2 and record["refine"]["steps"] == 2
    assert record["recipe"]["compress"]["heads"] == "0.5" and record["hub"] == {"repo_id": "tester/tiny-recipe"}
    evaluation = record["evaluation"]
    assert evaluation["perplexity"]["after"] > 1 and evaluation["perplexity"]["before"] > 1
    card = pushed["README.md"].decode()
    assert "base_model:" not in card or str(tiny_llama) not in card.split("---")[1]  # a local path is no base_model
    assert "tester/tiny-recipe" in card and "healed" in card and "perplexity" in card.lower()
    assert again.returncode == 0 and "reusing calibration statistics" in again.stdout + again.stderr
    assert other.returncode == 2 and "samples=4" in other.stderr and "3" in other.stderr
