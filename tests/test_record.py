"""kvconvert.json as a typed record: schema version, round trip, one-line refusals, and cards edited by hand."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvconvert.card import CARD, model_card
from kvconvert.errors import KVConvertError
from kvconvert.pipeline import CalibrationRequest, CompressRequest, run_compress
from kvconvert.record import RECORD, SCHEMA_VERSION, dump_record, load_record, parse_record
from tests.tiny import make_model


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("record")
    base = make_model(root / "base", "llama", heads=4, kv_heads=2)
    out = root / "conv"
    cal = CalibrationRequest(dataset="self", samples=2, seq_len=16, batch_size=2, device="cpu")
    run_compress(CompressRequest(str(base), "1", out, calibration=cal))
    return out


def test_a_compress_record_is_versioned_typed_and_round_trips(converted):
    text = (converted / RECORD).read_text()
    data = json.loads(text)
    assert next(iter(data)) == "schema_version" and data["schema_version"] == SCHEMA_VERSION
    record = load_record(converted)
    assert record.num_key_value_heads.before == 2 and record.num_key_value_heads.after == 1
    assert record.layers[0].groups == [[0, 1]] and record.kv_cache.bytes_per_token.after * 2 == (
        record.kv_cache.bytes_per_token.before
    )
    assert dump_record(record) == text  # reading and writing changes no byte
    assert (converted / CARD).read_text() == model_card(record)


def test_records_from_before_the_version_and_unknown_keys_still_read(converted):
    data = json.loads((converted / RECORD).read_text())
    del data["schema_version"]
    data["calibration"]["from_the_future"] = [1, 2]
    record = parse_record(data, "old.json")
    assert record.schema_version == 1
    assert json.loads(dump_record(record))["calibration"]["from_the_future"] == [1, 2]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"schema_version": SCHEMA_VERSION + 1}, "newer than this kvconvert"),
        ({"num_key_value_heads": {"before": "four", "after": 1}}, "num_key_value_heads.before"),
        ({"kvconvert_version": None}, "kvconvert_version"),
        ({"evaluation": {"dataset": "x"}}, "evaluation."),
    ],
)
def test_a_bad_record_is_one_line_naming_the_field(converted, change, message):
    data = json.loads((converted / RECORD).read_text()) | change
    with pytest.raises(KVConvertError) as err:
        parse_record(data, "kvconvert.json")
    assert message in str(err.value) and "\n" not in str(err.value)


@settings(max_examples=60, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda c: st.lists(c) | st.dictionaries(st.text(max_size=8), c),
        max_leaves=12,
    )
)
def test_any_json_either_reads_or_is_one_kvconvert_error(value):
    data = {"kvconvert_version": "0", "num_key_value_heads": value} if not isinstance(value, dict) else value
    try:
        parse_record(data, "r.json")
    except KVConvertError as exc:
        assert "\n" not in str(exc)


def eval_cli(model: Path, text: Path) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "kvconvert",
        "eval",
        str(model),
        "--dataset",
        str(text),
        "--samples",
        "2",
        "--seq-len",
        "16",
        "--device",
        "cpu",
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ | {"OMP_NUM_THREADS": "1"})


def test_eval_updates_its_own_card_but_never_one_edited_by_hand(converted, tmp_path, text_b):
    ours, edited = tmp_path / "ours", tmp_path / "edited"
    shutil.copytree(converted, ours)
    shutil.copytree(converted, edited)
    (edited / CARD).write_text("# my own card\n")
    r1, r2 = eval_cli(ours, text_b), eval_cli(edited, text_b)
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    assert "perplexity on" in (ours / CARD).read_text()  # re-rendered with the evaluation
    assert (edited / CARD).read_text() == "# my own card\n"
    assert "edited by hand" in r2.stderr and "left as it is" in r2.stderr
    for d in (ours, edited):
        assert load_record(d).evaluation.perplexity.after > 0
