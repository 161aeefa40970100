"""What a command prints when it is done: a line for people, or with `--json` one JSON object for programs
(the benchmarks read these instead of the tables)."""

from __future__ import annotations

import json
from typing import Any

SCHEMA_VERSION = 1
"""Version of the `--json` summaries' layout; raised when a key changes meaning or goes away."""


def emit(command: str, data: dict[str, Any], as_json: bool, text: str | None = None) -> None:
    """Print `data` as one JSON object (`--json`), else `text` (when given). Data that names its own `schema`
    (the eval report, `kvconvert-eval/1`) is printed as it is."""
    if as_json:
        header = {} if "schema" in data else {"schema_version": SCHEMA_VERSION, "command": command}
        print(json.dumps({**header, **data}, indent=2))
    elif text is not None:
        print(text)


def stage_table(console, timings: dict[str, float], total: bool) -> None:
    """The `time by stage` table."""
    from rich.table import Table

    table = Table(title="time by stage")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage, secs in timings.items():
        table.add_row(stage, f"{secs:.1f}")
    if total:
        table.add_row("total", f"{sum(timings.values()):.1f}")
    console.print(table)
