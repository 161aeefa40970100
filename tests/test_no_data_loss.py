"""Issue 17's rules through the real CLI: nothing kvconvert writes replaces data it must not, every check runs before
anything is replaced, killed or failing runs leave at most a hidden temporary that the next run handles, and every
OS error is one line with exit code 2. Rows of docs/reliability.md ("Writing outputs")."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvconvert.io.staging import output_lock
from tests.test_reliability import CAL, kvconvert, no_temporaries, refused, snapshot
from tests.tiny import make_model


def faulty(fault: str, arg: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tests.faults", fault, arg, "--", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, text_a):
    """A tiny model, its statistics, and a finished output to protect."""
    root = tmp_path_factory.mktemp("noloss")
    model = make_model(root / "model", "llama", layers=2)
    stats = root / "stats.safetensors"
    r = kvconvert("calibrate", str(model), "--dataset", str(text_a), *CAL, "-o", str(stats))
    assert r.returncode == 0, r.stderr
    return model, stats


def compress_args(model: Path, stats: Path, out: Path) -> list[str]:
    return ["compress", str(model), "--heads", "2", "--stats", str(stats), "-o", str(out), "--max-shard-size", "40KB"]


def old_output(setup, tmp_path) -> tuple[Path, dict]:
    model, stats = setup
    out = tmp_path / "out"
    r = kvconvert(*compress_args(model, stats, out), "--heads", "1")
    assert r.returncode == 0, r.stderr
    assert len(list(out.glob("*.safetensors"))) > 2  # several shards: faults can hit the middle of the write
    return out, snapshot(out)


@pytest.mark.parametrize("overwrite", [(), ("--overwrite",)])
def test_calibrate_never_replaces_the_model_weights(setup, tmp_path, text_a, overwrite):
    model, _ = setup
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    before = snapshot(copy)
    args = ("calibrate", str(copy), "--dataset", str(text_a), *CAL, *overwrite)
    refused(kvconvert(*args, "-o", str(copy / "model.safetensors")), "overlaps the input")
    assert snapshot(copy) == before


def test_calibrate_replaces_an_existing_file_only_with_overwrite(setup, tmp_path, text_a):
    model, _ = setup
    target = tmp_path / "notes.txt"
    target.write_text("precious")
    args = ("calibrate", str(model), "--dataset", str(text_a), *CAL, "-o", str(target))
    refused(kvconvert(*args), "already exists", "--overwrite")
    assert target.read_text() == "precious"
    assert kvconvert(*args, "--overwrite").returncode == 0
    assert load_file(target)["n_tokens"].item() == 4 * 32
    no_temporaries(tmp_path)


def test_failed_verify_leaves_the_old_output_byte_identical(setup, tmp_path):
    out, before = old_output(setup, tmp_path)
    r = faulty("bad-verify", "-", *compress_args(*setup, out), "--overwrite")
    refused(r, "differs from the in-memory conversion", "nothing was replaced")
    assert snapshot(out) == before
    no_temporaries(tmp_path)


def test_statistics_file_inside_the_model_is_not_read_as_weights(setup, tmp_path):
    model, stats = setup
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    shutil.copyfile(stats, copy / "stats.safetensors")
    save_file({"lora_A": torch.zeros(2, 2)}, copy / "adapter_model.safetensors")
    (copy / "model.safetensors").rename(copy / "weights.safetensors")  # no standard name: every other file is read
    out = tmp_path / "out"
    r = kvconvert(*compress_args(copy, copy / "stats.safetensors", out), "--no-verify")
    assert r.returncode == 0, r.stderr
    written = set().union(*(load_file(p).keys() for p in out.glob("*.safetensors")))
    assert written == set(load_file(copy / "weights.safetensors").keys())


@pytest.mark.parametrize("command", ["compress", "calibrate"])
def test_unwritable_output_is_one_line(setup, text_a, command):
    model, stats = setup
    out = Path("/proc/kvconvert-cannot-write/out")
    if command == "compress":
        r = kvconvert(*compress_args(model, stats, out))
    else:
        r = kvconvert("calibrate", str(model), "--dataset", str(text_a), *CAL, "-o", str(out))
    refused(r, "/proc/kvconvert-cannot-write")


def as_other_user(*args: str) -> subprocess.CompletedProcess:
    """The CLI as a user without write access: `nobody` (via setpriv) when the suite runs as root, who may write
    anywhere; otherwise the current user, for whom the mode bits already hold."""
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    if prefix and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: no user to lack write access")
    env = os.environ | {"HOME": "/tmp", "HF_HOME": "/tmp/kvconvert-nobody-hf"}
    cmd = [*prefix, sys.executable, "-m", "kvconvert", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.parametrize("command", ["compress", "calibrate"])
def test_read_only_directory_is_one_line(setup, text_a, command):
    """A directory without write permission (not a /proc path): refused before any work, nothing written."""
    model, stats = setup
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copytree(model, root / "model")
        shutil.copyfile(stats, root / "stats.safetensors")
        shutil.copyfile(text_a, root / "text.txt")
        (root / "ro").mkdir()
        for path in (root, *root.rglob("*")):
            path.chmod(0o755 if path.is_dir() else 0o644)
        (root / "ro").chmod(0o555)
        out = root / "ro" / "out"
        if command == "compress":
            r = as_other_user(*compress_args(root / "model", root / "stats.safetensors", out))
        else:
            r = as_other_user(
                "calibrate", str(root / "model"), "--dataset", str(root / "text.txt"), *CAL, "-o", str(out)
            )
        refused(r, str(root / "ro"), "Permission denied")
        assert list((root / "ro").iterdir()) == []
        (root / "ro").chmod(0o755)


@pytest.mark.parametrize(
    ("fault", "arg"),
    [("kill-at-tensor", "1"), ("kill-at-tensor", "9"), ("kill-after-weights", "-"), ("kill-between-renames", "-")],
)
def test_sigkill_during_the_write_then_a_rerun(setup, tmp_path, fault, arg):
    """SIGKILL at several moments: the old output survives (or is restored by the next run), only hidden
    temporaries are left, and the re-run succeeds and cleans them."""
    out, before = old_output(setup, tmp_path)
    r = faulty(fault, arg, *compress_args(*setup, out), "--overwrite")
    assert r.returncode == -9, r.stderr
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "out"]
    assert all(name.startswith((".out.kvconvert-", ".kvconvert-stats-")) for name in leftovers), leftovers
    if fault != "kill-between-renames":
        assert snapshot(out) == before
    else:  # the old output was set aside: the next run puts it back before anything else
        assert not out.exists()
        refused(kvconvert(*compress_args(*setup, out)), "not empty", "--overwrite")
        assert snapshot(out) == before
    r = kvconvert(*compress_args(*setup, out), "--overwrite")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 2
    no_temporaries(tmp_path)


def test_full_disk_is_one_line_then_a_rerun_succeeds(setup, tmp_path):
    out, before = old_output(setup, tmp_path)
    r = faulty("enospc-at-tensor", "5", *compress_args(*setup, out), "--overwrite")
    refused(r, "No space left on device", "nothing was replaced")
    assert snapshot(out) == before
    no_temporaries(tmp_path)
    assert kvconvert(*compress_args(*setup, out), "--overwrite").returncode == 0


def test_a_second_run_on_the_same_output_is_refused(setup, tmp_path):
    out, before = old_output(setup, tmp_path)
    with output_lock(out):  # another process holds the output
        refused(kvconvert(*compress_args(*setup, out), "--overwrite"), "another kvconvert run is writing")
    assert snapshot(out) == before
    no_temporaries(tmp_path)


def test_heads_one_point_zero_is_all_heads_not_one(setup, tmp_path):
    model, stats = setup
    out = tmp_path / "out"
    refused(kvconvert(*compress_args(model, stats, out), "--heads", "1.0"), "not lower")
    r = kvconvert(*compress_args(model, stats, out), "--heads", "1/4", "--no-verify")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 1


def test_statistics_of_a_model_that_differs_only_in_mlp_or_norms_are_refused(setup, tmp_path):
    model, stats = setup
    for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.0.post_attention_layernorm.weight"):
        copy = tmp_path / name
        shutil.copytree(model, copy)
        tensors = load_file(copy / "model.safetensors")
        tensors[name] = tensors[name] * 1.01
        save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
        refused(kvconvert(*compress_args(copy, stats, tmp_path / "out")), "another model", "weights_sha256")
        assert not (tmp_path / "out").exists()


def test_pickle_cache_follows_edits_to_config_and_tokenizer(setup, tmp_path, monkeypatch):
    from kvconvert.checkpoint import resolve

    model, _ = setup
    pickled = tmp_path / "pickled"
    shutil.copytree(model, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(model / "model.safetensors"), pickled / "pytorch_model.bin")
    monkeypatch.setenv("KVCONVERT_CACHE", str(tmp_path / "cache"))
    first = resolve(str(pickled), allow_pickle=True).path
    for name in ("config.json", "tokenizer_config.json"):
        data = json.loads((pickled / name).read_text()) | {"edited": name}
        (pickled / name).write_text(json.dumps(data))
        again = resolve(str(pickled), allow_pickle=True).path
        assert again != first and json.loads((again / name).read_text())["edited"] == name
        first = again


def test_two_process_calibration_with_a_cold_cache(setup, tmp_path, text_a):
    """torchrun ranks both resolve a pickle checkpoint into an empty cache: one builds it under a lock, the other
    waits; repeated with a fresh cache each time."""
    model, _ = setup
    pickled = tmp_path / "pickled"
    shutil.copytree(model, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(model / "model.safetensors"), pickled / "pytorch_model.bin")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for attempt in range(2):
        env = os.environ | {"KVCONVERT_CACHE": str(tmp_path / f"cache{attempt}"), "OMP_NUM_THREADS": "1"}
        out = tmp_path / f"stats{attempt}.safetensors"
        cmd = [*torchrun, "-m", "kvconvert", "calibrate", str(pickled), "--allow-pickle", "--dataset", str(text_a)]
        r = subprocess.run([*cmd, *CAL, "-o", str(out)], capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert load_file(out)["n_tokens"].item() == 4 * 32
