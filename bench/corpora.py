"""Local text for benchmarks, materialised at run time from the Python interpreter itself (nothing committed).

`pydoc-a.txt` and `pydoc-b.txt` split the language-reference topics of the standard library's `pydoc_data`
module (alternate topics in sorted order), so calibration and evaluation read different documents.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_DIR = Path(".bench-cache/text")


def pydoc_split(directory: Path = DEFAULT_DIR) -> tuple[Path, Path]:
    """Write (if needed) and return the two halves of the pydoc topics as local text files."""
    from pydoc_data.topics import topics

    directory.mkdir(parents=True, exist_ok=True)
    keys = sorted(topics)
    paths = []
    for part, offset in (("a", 0), ("b", 1)):
        path = directory / f"pydoc-{part}.txt"
        if not path.exists():
            path.write_text("\n\n".join(topics[k] for k in keys[offset::2]))
        paths.append(path)
    return paths[0], paths[1]


def pydoc_jsonl(directory: Path = DEFAULT_DIR) -> Path:
    """pydoc-b as JSON lines, one topic per document (the `text` field), for lm-evaluation-harness tasks."""
    import json
    from pydoc_data.topics import topics

    path = directory / "pydoc-b.jsonl"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        keys = sorted(topics)[1::2]
        path.write_text("".join(json.dumps({"topic": k, "text": topics[k]}) + "\n" for k in keys))
    return path


def pydoc_all(directory: Path = DEFAULT_DIR) -> Path:
    """Both halves in one file (for benchmarks that need more text and no held-out part)."""
    a, b = pydoc_split(directory)
    path = directory / "pydoc-all.txt"
    if not path.exists():
        path.write_text(a.read_text() + "\n\n" + b.read_text())
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    directory = parser.parse_args().dir
    for p in (*pydoc_split(directory), pydoc_jsonl(directory)):
        print(p)
