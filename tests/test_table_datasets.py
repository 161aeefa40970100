"""Local table datasets (.jsonl, .json, .parquet, .csv): which column is the text, and the errors when it is unclear."""

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from kvconvert.cli import _register, app
from kvconvert.errors import KVConvertError
from kvconvert.textdata import iter_documents

_register()
ROWS = [{"n": i, "body": f"row {i}: the cache head keeps key {i} and value {i}."} for i in range(40)]


def write(path, rows):
    """`rows` as the table file `path` names (pandas writes pyarrow's large_string for text: parquet, csv)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(autouse=True)
def own_datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_the_only_text_column_is_the_text_whatever_its_name(tmp_path, suffix):
    """A table whose one text column is not called `text` (parquet and csv used to say it had none)."""
    path = write(tmp_path / f"t{suffix}", ROWS)
    assert list(iter_documents(str(path))) == [r["body"] for r in ROWS]


def test_text_wins_and_several_text_columns_need_a_name(tmp_path):
    both = [{"url": f"u{i}", "text": f"t{i}"} for i in range(3)]
    assert list(iter_documents(str(write(tmp_path / "a.parquet", both)))) == ["t0", "t1", "t2"]
    two = [{"url": f"u{i}", "body": f"b{i}"} for i in range(3)]
    path = write(tmp_path / "b.parquet", two)
    with pytest.raises(KVConvertError, match=r"several text columns \(url, body\); name one with --text-field"):
        list(iter_documents(str(path)))
    assert list(iter_documents(str(path), "body")) == ["b0", "b1", "b2"]
    with pytest.raises(KVConvertError, match=r"no column 'title' \(columns: url, body\)"):
        list(iter_documents(str(path), "title"))
    numbers = write(tmp_path / "c.csv", [{"n": 1, "m": 2}])
    with pytest.raises(KVConvertError, match=r"no text column \(columns: n, m\)"):
        list(iter_documents(str(numbers)))


def test_eval_takes_a_text_field(tmp_path, tiny_llama):
    """`eval` has `--text-field` like calibrate and heal (a table with two text columns)."""
    rows = [{"url": f"u{i}", "body": r["body"]} for i, r in enumerate(ROWS)]
    path = write(tmp_path / "t.parquet", rows)
    args = ["eval", str(tiny_llama), "--dataset", str(path), "--samples", "2", "--seq-len", "16", "--json"]
    failed = CliRunner().invoke(app, args)  # in-process, the error is raised (the entry point prints its line)
    assert isinstance(failed.exception, KVConvertError) and "several text columns" in str(failed.exception)
    done = CliRunner().invoke(app, [*args, "--text-field", "body"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["model"]["perplexity"] > 1 and report["text_field"] == "body"
