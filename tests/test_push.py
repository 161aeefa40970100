"""`kvconvert push` through the real huggingface_hub client, against a local stand-in for the Hub (tests/fakehub)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvconvert.pipeline import CalibrationRequest, CompressRequest, run_compress
from tests.fakehub import FakeHub

TOKEN = "hf_kvconvertTESTtoken0123456789"


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_llama, text_a) -> Path:
    out = tmp_path_factory.mktemp("push") / "tiny-2kv"
    run_compress(
        CompressRequest(
            str(tiny_llama),
            "2",
            out,
            calibration=CalibrationRequest(dataset=str(text_a), samples=4, seq_len=32, batch_size=4),
        )
    )
    return out


def push_cli(hub: FakeHub | None, *args: str, token: str | None = TOKEN, home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    if hub is not None:
        env["HF_ENDPOINT"] = hub.url
    if token is not None:
        env["HF_TOKEN"] = token
    cmd = [sys.executable, "-m", "kvconvert", "push", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def disk_files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def test_push_uploads_every_file_and_never_shows_the_token(converted, tmp_path):
    (converted / ".cache").mkdir(exist_ok=True)
    (converted / ".cache" / "junk").write_text("local state")  # hidden: never uploaded
    with FakeHub(token=TOKEN) as hub:
        dry = push_cli(hub, str(converted), "tester/tiny-2kv", "--dry-run", home=tmp_path)
        assert dry.returncode == 0, dry.stderr
        r = push_cli(hub, str(converted), "tester/tiny-2kv", home=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "tester/tiny-2kv" in r.stdout
        got = hub.files("tester/tiny-2kv")
        assert hub.requests and all(auth in (None, f"Bearer {TOKEN}") for _, _, auth in hub.requests)
    for out in (dry, r):
        assert TOKEN not in out.stdout + out.stderr
    assert "HF_TOKEN" in dry.stdout  # where the token comes from, not what it is
    want = {k: v for k, v in disk_files(converted).items() if not k.startswith(".")}
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], name  # the record and card now name the repo on disk too
    record = json.loads(got["kvconvert.json"])
    assert record["hub"] == {"repo_id": "tester/tiny-2kv"}
    assert "tester/tiny-2kv" in got["README.md"].decode()
    listed = {line.split()[-1]: int(line.split()[0].replace(",", "")) for line in dry.stdout.splitlines()[1:-1]}
    assert listed == {name: len(data) for name, data in got.items()}  # --dry-run listed exactly what arrived


def test_push_to_a_pull_request_and_to_a_branch(converted, tmp_path):
    with FakeHub(token=TOKEN) as hub:
        assert push_cli(hub, str(converted), "kvorg/tiny", home=tmp_path).returncode == 0
        pr = push_cli(hub, str(converted), "kvorg/tiny", "--create-pr", "--commit-message", "try", home=tmp_path)
        assert pr.returncode == 0, pr.stderr
        assert "discussions/1" in pr.stdout
        branch = push_cli(hub, str(converted), "kvorg/tiny", "--revision", "v2", home=tmp_path)
        assert branch.returncode == 0, branch.stderr
        repo = hub.repos["kvorg/tiny"]
        assert len(repo.prs) == 1 and repo.prs[0]["commit"]["summary"] == "try"
        assert sorted(repo.branches) == ["main", "v2"] and repo.branches["v2"] == repo.branches["main"]


@pytest.mark.parametrize(
    ("args", "token", "message"),
    [
        (("tester/x",), "hf_wrongtoken", "rejected the token"),
        (("tester/x",), None, "no Hugging Face token"),
        (("not a repo id",), TOKEN, "not a valid Hub repo id"),
        (("tester/x", "--create-pr", "--revision", "dev"), TOKEN, "drop --revision"),
    ],
)
def test_push_errors_are_one_line_without_the_token(converted, tmp_path, args, token, message):
    with FakeHub(token=TOKEN) as hub:
        r = push_cli(hub, str(converted), *args, token=token, home=tmp_path)
        assert not hub.repos
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert TOKEN not in r.stderr + r.stdout and "hf_wrongtoken" not in r.stderr + r.stdout


def test_push_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    r = push_cli(None, str(tmp_path / "empty"), "tester/x", "--dry-run", home=tmp_path)
    assert r.returncode == 2 and "config.json" in r.stderr


def test_push_never_replaces_files_it_did_not_upload_unless_overwrite(converted, tmp_path):
    from tests.fakehub import Repo

    theirs = {".gitattributes": b"*.bin filter=lfs\n", "config.json": b'{"theirs": 1}', "notes.txt": b"keep me"}
    with FakeHub(token=TOKEN) as hub:
        hub.repos["tester/someone-else"] = Repo(private=False, branches={"main": dict(theirs)})
        refused = push_cli(hub, str(converted), "tester/someone-else", home=tmp_path)
        after_refusal = hub.files("tester/someone-else")
        branch = push_cli(hub, str(converted), "tester/someone-else", "--revision", "kv", home=tmp_path)
        pr = push_cli(hub, str(converted), "tester/someone-else", "--create-pr", home=tmp_path)
        forced = push_cli(hub, str(converted), "tester/someone-else", "--overwrite", home=tmp_path)
        forced_files = hub.files("tester/someone-else")
        again = push_cli(hub, str(converted), "tester/someone-else", home=tmp_path)  # now it holds kvconvert's files
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "config.json" in lines[0] and "--overwrite" in lines[0], refused.stderr
    assert after_refusal == theirs  # nothing uploaded
    assert branch.returncode == 2 and "config.json" in branch.stderr  # a new branch starts from main's files
    assert pr.returncode == 0, pr.stderr  # a pull request replaces nothing until merged
    assert forced.returncode == 0, forced.stderr
    assert forced_files["notes.txt"] == b"keep me" and forced_files["config.json"] != theirs["config.json"]
    assert again.returncode == 0, again.stderr
