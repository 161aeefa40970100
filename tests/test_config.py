"""Stage configs: one place for each option; the CLI and a recipe check values the same way and give the same
outputs; merge methods are plug-ins found by their file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
import yaml
from typer.testing import CliRunner

from kvconvert.cli import _register, app
from kvconvert.config import CalibrateConfig, CompressRequest, ConfigError, Dtype, Method, TrainMode
from kvconvert.merge import registry

_register()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvconvert", *args], capture_output=True, text=True, timeout=600)


def test_choices_are_the_registries():
    from kvconvert.heal.trainable import TRAIN_MODES
    from kvconvert.merge.methods import METHODS
    from kvconvert.modeling import DTYPES

    files = {p.stem for p in (Path(registry.__file__).parent / "methods").glob("[!_]*.py")}
    assert set(get_args(Method)) == set(METHODS) == files and registry.names()[0] == registry.DEFAULT
    assert all(METHODS[name].name == name for name in METHODS)
    assert get_args(TrainMode) == TRAIN_MODES and set(get_args(Dtype)) == {"auto", *DTYPES}


def test_former_positional_requests_still_build():
    assert CalibrateConfig("a.txt", 4, 32, 2, device="cpu") == CalibrateConfig(
        dataset="a.txt", samples=4, seq_len=32, batch_size=2, device="cpu"
    )
    req = CompressRequest("m", 2, "out")
    assert (req.model, req.heads, req.output) == ("m", "2", Path("out")) and req.calibration.samples == 128


def test_library_typos_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"unknown key metod \(did you mean method\?\)"):
        CompressRequest("m", "1", "o", metod="svd")
    with pytest.raises(ConfigError, match="samples: Input should be greater than or equal to 1"):
        CalibrateConfig(samples=0)


@pytest.mark.parametrize(
    ("flags", "section", "key"),
    [
        (["--method", "best"], {"compress": {"heads": 1, "method": "best"}}, "method"),
        (["--samples", "0"], {"compress": {"heads": 1}, "calibrate": {"samples": 0}}, "samples"),
        (["--refine-inputs", "x"], {"compress": {"heads": 1, "refine": {"inputs": "x"}}}, "inputs"),
    ],
)
def test_cli_and_recipe_give_the_same_error(tmp_path, flags, section, key):
    r = cli("compress", "m", "-o", str(tmp_path / "o"), "--heads", "1", *flags)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": "m", "output": str(tmp_path / "o"), **section}))
    s = cli("run", str(recipe), "--dry-run")
    assert r.returncode == s.returncode == 2
    (line,), (recipe_line,) = r.stderr.splitlines(), s.stderr.splitlines()
    what = line.split(": ", 3)[-1].removesuffix(" (see kvconvert compress --help)")
    assert f"{key}: {what}" in recipe_line and flags[0] in line, (line, recipe_line)


def test_cli_and_recipe_write_byte_identical_checkpoints(tmp_path, tiny_llama, text_a):
    from kvconvert.recipe import parse_recipe
    from kvconvert.workflow import run_recipe

    args = ["--dataset", str(text_a), "--samples", "4", "--seq-len", "32", "--batch-size", "2", "--device", "cpu"]
    args += ["--method", "svd", "--refine-steps", "2", "--refine-samples", "2", "--json"]
    r = CliRunner().invoke(app, ["compress", str(tiny_llama), "--heads", "2", "-o", str(tmp_path / "cli"), *args])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["schema_version"] == 1 and summary["num_key_value_heads"] == {"before": 4, "after": 2}
    assert summary["verify"]["ok"] and set(summary["timings"]) >= {"calibrate", "decompose", "refine", "export"}

    recipe = {
        "model": str(tiny_llama),
        "output": str(tmp_path / "recipe"),
        "calibrate": {"dataset": str(text_a), "samples": 4, "seq_len": 32, "batch_size": 2, "device": "cpu"},
        "compress": {"heads": 2, "method": "svd", "refine": {"steps": 2, "samples": 2}},
    }
    run_recipe(parse_recipe(recipe, "test"))
    cli_dir, recipe_dir = tmp_path / "cli", tmp_path / "recipe"
    assert sorted(p.name for p in cli_dir.iterdir()) == sorted(p.name for p in recipe_dir.iterdir())
    for path in cli_dir.iterdir():
        if path.name not in ("kvconvert.json", "README.md"):  # the recipe's record adds the recipe itself
            assert path.read_bytes() == (recipe_dir / path.name).read_bytes(), path.name
    record = json.loads((recipe_dir / "kvconvert.json").read_text())
    assert record.pop("recipe")["compress"]["method"] == "svd"
    assert record == json.loads((cli_dir / "kvconvert.json").read_text())


def test_scale_bench_reads_the_json_summary():
    from bench.scale import stage_times

    text = 'a warning\n{\n  "schema_version": 1,\n  "command": "compress",\n  "timings": {"load": 0.5}\n}\n'
    assert stage_times(text) == {"load": 0.5}
