"""The CLI parses, calls the library, and turns input errors into one line + exit code 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvconvert.cli import _register, app
from kvconvert.errors import KVConvertError
from kvconvert.families import AttentionGeometry
from kvconvert.targets import parse_heads, valid_counts

_register()
runner = CliRunner()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvconvert", *args], capture_output=True, text=True)


def test_calibrate_then_compress_then_eval(tmp_path, tiny_llama, text_a, text_b):
    stats = tmp_path / "stats.safetensors"
    r = runner.invoke(
        app,
        [
            "calibrate",
            str(tiny_llama),
            "--dataset",
            str(text_a),
            "--samples",
            "4",
            "--seq-len",
            "32",
            "--device",
            "cpu",
            "--output",
            str(stats),
        ],
    )
    assert r.exit_code == 0, r.output
    out = tmp_path / ("[draft] " + "a-long-output-name-" * 5)  # brackets rich would read as markup; > 80 columns
    r = runner.invoke(app, ["compress", str(tiny_llama), "--heads", "0.25", "--stats", str(stats), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "time by stage" in r.output and "verified" in r.output
    assert f"wrote {out}\n" in r.output  # printed as given, on one line
    record = json.loads((out / "kvconvert.json").read_text())
    assert record["num_key_value_heads"] == {"before": 4, "after": 1}
    assert len(record["layers"]) == 2 and record["calibration"]["dataset"] == str(text_a)
    args = ["eval", str(out), *f"--baseline {tiny_llama} --dataset {text_b} --samples 2 --seq-len 32 --json".split()]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["model"]["kv_cache"]["bytes_per_token"] * 4 == report["baseline"]["kv_cache"]["bytes_per_token"]
    assert report["model"]["perplexity"] > 1 and report["baseline"]["perplexity"] > 1
    r = runner.invoke(app, args[:-1])  # the tables: whole paths, nothing cut at 80 columns
    assert r.exit_code == 0, r.output
    assert str(out) in r.output and str(tiny_llama) in r.output


@pytest.mark.parametrize(("heads", "message"), [("3", "does not divide"), ("4", "not lower"), ("0.3", "keeps")])
def test_bad_heads_exit_2_with_one_line(tiny_llama, tmp_path, heads, message):
    r = cli("compress", str(tiny_llama), "--heads", heads, "-o", str(tmp_path / "o"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "valid counts" in lines[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["compress", "run", "calibrate"])
def test_a_full_output_is_refused_before_the_model_is_fetched_or_expanded(tmp_path, monkeypatch, command):
    from gguf import GGUFValueType

    from tests.test_gguf_metadata import write_gguf

    gguf, out, cache = tmp_path / "m.gguf", tmp_path / "out", tmp_path / "cache"
    write_gguf(gguf, {"general.name": (GGUFValueType.STRING, None, "m")})  # a header only: expanding it would fail
    out.mkdir()
    (out / "keep.txt").write_text("a user's file")
    monkeypatch.setenv("KVCONVERT_CACHE", str(cache))
    if command == "compress":
        args = ["compress", str(gguf), "--heads", "1", "--dataset", "pydoc", "-o", str(out)]
    elif command == "calibrate":
        out = out / "keep.txt"  # an existing statistics output
        args = ["calibrate", str(gguf), "--dataset", "pydoc", "-o", str(out)]
    else:
        recipe = tmp_path / "r.yaml"
        recipe.write_text(f"model: {gguf}\noutput: {out}\ncompress: {{heads: 1}}\ncalibrate: {{dataset: pydoc}}\n")
        args = ["run", str(recipe)]
    r = runner.invoke(app, args)  # in process, so the error is not yet the one line and exit code 2 of `main`
    assert isinstance(r.exception, KVConvertError), r.output
    assert ("already exists" if command == "calibrate" else "is not empty") in str(r.exception)
    assert (tmp_path / "out" / "keep.txt").read_text() == "a user's file" and not (cache / "gguf").exists()


@pytest.mark.parametrize("damage", ["cut", "alien"])
def test_a_cut_or_unsupported_gguf_is_one_line_and_leaves_no_cache_entry(tmp_path, damage):
    from tests.test_gguf_metadata import write_model_gguf

    gguf, cache = tmp_path / "m.gguf", tmp_path / "cache"
    write_model_gguf(gguf, arch="alien" if damage == "alien" else "llama")
    if damage == "cut":
        gguf.write_bytes(gguf.read_bytes()[:-100])  # an interrupted download
    env = os.environ | {"KVCONVERT_CACHE": str(cache)}
    args = [sys.executable, "-m", "kvconvert", "compress", str(gguf), "--heads", "1", "-o", str(tmp_path / "o")]
    r = subprocess.run(args, capture_output=True, text=True, env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    error = [line for line in r.stderr.splitlines() if line.startswith("kvconvert: error:")]
    assert len(error) == 1 and "Traceback" not in r.stderr
    assert ("cut short" if damage == "cut" else "architecture alien is not supported") in error[0]
    assert not [p for p in (cache / "gguf").iterdir() if p.is_dir()]
    assert not (tmp_path / "o").exists()


def test_unsupported_family_names_the_supported_ones(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    r = cli("compress", str(tmp_path / "gpt2"), "--heads", "1", "-o", str(tmp_path / "o"))
    assert r.returncode == 2
    assert "GPT2LMHeadModel" in r.stderr and "LlamaForCausalLM" in r.stderr and "Qwen2ForCausalLM" in r.stderr


def test_valid_counts_and_parsing():
    geom = AttentionGeometry(576, 30, 9, 3, 64, 64)
    assert valid_counts(geom) == [1]
    assert parse_heads("1", geom) == 1
    mha = AttentionGeometry(4096, 32, 32, 32, 128, 128)
    assert valid_counts(mha) == [1, 2, 4, 8, 16]
    assert parse_heads("0.25", mha) == 8 and parse_heads("16", mha) == 16
    with pytest.raises(KVConvertError, match=r"valid counts .*: 1, 2, 4, 8, 16"):
        parse_heads("12", mha)
    with pytest.raises(KVConvertError):
        parse_heads("half", mha)


def test_help_groups_options_in_panels_with_metavars():
    r = runner.invoke(app, ["compress", "--help"], env={"COLUMNS": "160"}, terminal_width=160)
    assert r.exit_code == 0
    text = r.output
    for panel in ("Input", "Calibration", "Merge", "Refine", "Output", "Safety"):
        assert f"─ {panel} ─" in text, panel
    assert "compress [OPTIONS] MODEL" in text and "{" not in text.split("\n\n")[1]
    assert "<bool>" not in text and "<str>" not in text.split("─ Options ─")[1]
    assert "--output" in text and "DIR" in text and "weighted|" in text
    assert "--stats" in text and "FILE" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compress", "m", "--heads", "1", "-o", "o", "--samples", "abc"], "'--samples'"),
        (["compress", "m", "--heads", "1", "-o", "o", "--samples", "0"], "--samples: Input should be greater"),
        (["compress", "m", "--heads", "1", "-o", "o", "--method", "best"], "--method: 'best' is not one of"),
        (["compress", "m", "--heads", "1"], "Missing option '--output'"),
        (["compress", "m", "--heads", "1", "-o", "o", "--bogus"], "No such option: --bogus"),
        (["compres"], "No such command"),
        (["heal", "s", "--teacher", "t", "-o", "o", "--kl-weight", "0"], "not both 0"),
        (["eval", "m", "--contexts", "1,x"], "--contexts: a comma-separated list"),
    ],
)
def test_argument_errors_are_one_line_and_exit_2(args, message):
    """Typer's own usage errors and the configs' checks alike: one line on stderr, nothing on stdout."""
    r = cli(*args)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvconvert: error: ") and message in lines[0], r.stderr


def test_help_and_argument_errors_import_no_heavy_library():
    code = (
        "import sys; sys.argv = ['kvconvert', 'compress', 'm', '--heads', '1', '-o', 'o', '--samples', '0'];"
        "from kvconvert.cli import main\n"
        "try: main()\n"
        "except SystemExit: pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


def test_datasets_loaded_after_the_cli_quieted_the_libraries_stays_quiet():
    """`quiet_libraries` no longer imports `datasets` (0.5 s a command that reads no text): loaded later, its bars
    and info logs are off all the same."""
    code = (
        "import sys; from kvconvert.cli import quiet_libraries; quiet_libraries()\n"
        "assert 'datasets' not in sys.modules\n"
        "import datasets, logging\n"
        "print(datasets.utils.are_progress_bars_disabled(), datasets.logging.get_verbosity() == logging.ERROR)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_DATASETS_", "DATASETS_"))}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.stdout.strip() == "True True", r.stdout + r.stderr


def test_json_summaries_carry_a_schema_version(tmp_path, tiny_llama, text_a):
    stats = tmp_path / "s.safetensors"
    args = ["calibrate", str(tiny_llama), "--dataset", str(text_a), "--samples", "2", "--seq-len", "16"]
    r = runner.invoke(app, [*args, "--device", "cpu", "-o", str(stats), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["schema_version"] == 1 and summary["command"] == "calibrate" and summary["tokens"] == 32
    recipe = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))[0]
    r = runner.invoke(app, ["run", str(recipe), "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["command"] == "run" and plan["dry_run"] and plan["steps"][0].startswith("model: ")


def test_calibrate_reports_the_seconds_of_its_parts(tmp_path, tiny_llama, text_a):
    """Where a calibration's time went: load, text, layer pass, finishing the file (JSON and the stage table)."""
    args = ["calibrate", str(tiny_llama), "--dataset", str(text_a), "--samples", "2", "--seq-len", "16"]
    r = runner.invoke(app, [*args, "--device", "cpu", "-o", str(tmp_path / "a.safetensors"), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    timings = summary["timings"]
    assert list(timings) == ["load", "text", "layers", "finish"]
    assert all(v >= 0 for v in timings.values()) and sum(timings.values()) <= summary["seconds"]
    r = runner.invoke(app, [*args, "--device", "cpu", "-o", str(tmp_path / "b.safetensors")])
    assert r.exit_code == 0, r.output
    assert "time by stage" in r.stdout
    from bench.gpu_scale import calibrate_times  # what the GPU benchmark reads of that table

    assert set(timings) <= set(calibrate_times(r.stdout))


def test_the_exit_without_teardown_still_joins_threads_runs_atexit_and_flushes(tmp_path):
    """`main` ends with `os._exit` (no interpreter teardown), after what a normal exit does for outputs."""
    code = (
        "import atexit, sys, threading, time\n"
        f"root = {str(tmp_path)!r}\n"
        "atexit.register(lambda: open(root + '/atexit', 'w').write('ran'))\n"
        "def late():\n"
        "    time.sleep(0.5); open(root + '/thread', 'w').write('done')\n"
        "threading.Thread(target=late).start()\n"
        "sys.stdout.write('buffered, no newline')\n"
        "sys.argv = ['kvconvert', '--help']\n"
        "from kvconvert.cli import main\n"
        "main()\n"
        "print('never reached')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("buffered, no newline") and "compress" in r.stdout and "never reached" not in r.stdout
    assert (tmp_path / "atexit").read_text() == "ran" and (tmp_path / "thread").read_text() == "done"
