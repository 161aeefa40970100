"""Local table files (`.jsonl`, `.json`, `.parquet`, `.csv`) read with `datasets`: one error line for a file it
cannot read, none for a file that holds no rows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from kvconvert.errors import KVConvertError, first_line
from kvconvert.textfile import not_utf8

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
"""`datasets` loader of each table suffix."""


def local_table(path: Path):
    """A local table file as a `datasets` table; None when it holds no rows (empty, blank, or a csv header alone).
    A file `datasets` cannot read (not UTF-8, malformed, not of its suffix's format) is one KVConvertError."""
    import datasets

    verbosity = datasets.logging.get_verbosity()  # quiet its own "Failed to read file ..." line: ours says it
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        return datasets.load_dataset(FORMATS[path.suffix], data_files=str(path), split="train")
    except Exception as exc:
        if holds_no_rows(path):
            return None
        raise unreadable(path, exc) from None
    finally:
        datasets.logging.set_verbosity(verbosity)


def checked_rows(ds, path: Path) -> Iterator[dict]:
    """The rows of a local table; a row that cannot be decoded (invalid UTF-8 in a json string) is one error."""
    rows = iter(ds)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as exc:
            raise unreadable(path, exc) from None
        yield row


def holds_no_rows(path: Path) -> bool:
    """Whether a table file has no data lines: nothing but whitespace, or (csv) one line, its header."""
    allowed = 1 if path.suffix == ".csv" else 0
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                allowed -= 1
                if allowed < 0:
                    return False
    return True


def unreadable(path: Path, exc: BaseException) -> KVConvertError:
    chain, seen = [], exc
    while seen is not None and len(chain) < 20:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    if any(isinstance(e, UnicodeDecodeError) for e in chain):
        return not_utf8(path)
    causes = [e for e in chain if not isinstance(e, _generation_errors())]
    reason = first_line(causes[0] if causes else exc)
    return KVConvertError(
        f"cannot read dataset file {path} as {FORMATS[path.suffix]} ({reason}); fix the file or convert it"
    )


def _generation_errors() -> tuple[type[BaseException], ...]:
    """`datasets`' wrapper around a loader's own error (its message says nothing about the file)."""
    from datasets.exceptions import DatasetGenerationError

    return (DatasetGenerationError,)
