"""bench.razor on a tiny model: both question modes, the key draws of a split run, and the rendered tables."""

from __future__ import annotations

import json
import sys

import pytest

from bench import razor


def _run(monkeypatch, tmp_path, model, name: str, *extra: str) -> dict:
    out = tmp_path / f"{name}.json"
    argv = ["bench.razor", "--model", str(model), "--profile", str(tmp_path / "p.json"), "--json", str(out)]
    rule = ["--window-floor", "16", "--sinks", "2", "--digits", "3", "--depths", "0.5"]
    monkeypatch.setattr(sys, "argv", [*argv, *rule, *extra])
    razor.main()
    return json.loads(out.read_text())


def test_question_modes_key_draws_and_render(monkeypatch, tmp_path, tiny_llama):
    """`--question both` gives a row per method and mode (a full cache answers the same either way, since the
    question sees everything); a run of the second context alone with `--skip-keys 1` draws the key the whole run
    drew for it; the render has a column per method and mode."""
    (tmp_path / "p.json").write_text(json.dumps({"schema": "kvconvert-razor-profile/1", "retrieval": [[0], []]}))
    both = _run(monkeypatch, tmp_path, tiny_llama, "both", "--contexts", "300,400", "--methods", "full,razor")
    rows = both["rows"]
    assert [(r["context"], r["method"], r["question"]) for r in rows] == [
        (c, m, q) for c in (300, 400) for m in ("full", "razor") for q in ("prompt", "after")
    ]
    for ctx in (300, 400):
        full = [r["answer"] for r in rows if r["context"] == ctx and r["method"] == "full"]
        assert full[0] == full[1]
    assert rows[0]["key"] != rows[-1]["key"]
    alone = _run(monkeypatch, tmp_path, tiny_llama, "alone", "--contexts", "400", "--methods", "full")
    skip = ["--contexts", "400", "--methods", "full", "--skip-keys", "1", "--question", "prompt"]
    skipped = _run(monkeypatch, tmp_path, tiny_llama, "skip", *skip)["rows"]
    assert [r["key"] for r in skipped] == [rows[-1]["key"]] != [alone["rows"][0]["key"]]
    table = razor.render([both])
    header = next(line for line in table.splitlines() if line.startswith("| context"))
    assert header == "| context | depth | full | full (q after) | razor | razor (q after) |"
    assert table.count("**accuracy**") == 1


def test_masked_baseline_has_razors_quality_and_the_full_memory(monkeypatch, tmp_path, tiny_llama):
    """`--masked`: the same heads windowed by a mask over a full cache score what razor scores when every token
    reads its own window and no compensation token is kept, while holding the full cache's bytes."""
    from tests.tiny import WORDS

    text = tmp_path / "t.txt"
    text.write_text(" ".join(WORDS[i % len(WORDS)] for i in range(0, 700, 3)))
    (tmp_path / "p.json").write_text(json.dumps({"schema": "kvconvert-razor-profile/1", "retrieval": [[1], []]}))
    args = ["--contexts", "", "--methods", "razor", "--ppl-text", str(text), "--ppl-tokens", "150"]
    args += ["--ppl-skip", "20", "--chunk", "32", "--prompt-attention", "window", "--no-compensation", "--masked"]
    rows = _run(monkeypatch, tmp_path, tiny_llama, "masked", *args)["rows"]
    razor_row, masked = rows
    assert masked["method"] == "masked" and razor_row["context"] == masked["context"] > 100
    assert masked["perplexity"] == pytest.approx(razor_row["perplexity"], rel=1e-4)
    assert masked["kv_bytes"] == razor_row["full_bytes"] > razor_row["measured_bytes"] == razor_row["kv_bytes"]
