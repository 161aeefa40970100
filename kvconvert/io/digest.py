"""Content digests of input files, read once per file: a cache keyed by what a file holds, not where it lies, is
hit again after a reinstall, a fresh clone or a move (each of which used to leave another full-size copy behind)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from filelock import FileLock

from kvconvert.io.staging import write_text

MEMO = "digests.json"
"""Per cache folder: path -> {size, mtime_ns, sha256}, so a file is hashed again only when it changes."""


def file_digest(path: Path, memo_dir: Path) -> str:
    """The sha256 of `path`, remembered in `memo_dir/digests.json` under the file's size and mtime.

    A memo that is missing, damaged or written by another version is rebuilt; lines of files that no longer exist
    are dropped when it is written, so it holds one line per input file that still exists.
    """
    path = path.resolve()
    stat = path.stat()
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    memo_path = memo_dir / MEMO
    lock: FileLock | None = FileLock(memo_dir / f".{MEMO}.lock")
    try:
        memo_dir.mkdir(parents=True, exist_ok=True)
        with lock:
            memo = _read(memo_path)
    except OSError:  # a read-only cache (shared, prebuilt): its memo is read, never written
        lock, memo = None, _read(memo_path)
    known = memo.get(str(path))
    if isinstance(known, dict) and {k: known.get(k) for k in stamp} == stamp and isinstance(known.get("sha256"), str):
        return known["sha256"]
    digest = sha256_of(path)  # outside the lock: other files' lookups need not wait for a large read
    if lock is None:
        return digest
    with lock:
        memo = {p: v for p, v in _read(memo_path).items() if Path(p).exists()}
        memo[str(path)] = stamp | {"sha256": digest}
        write_text(memo_path, json.dumps(memo, indent=1, sort_keys=True) + "\n")
    return digest


def sha256_of(path: Path, chunk: int = 1 << 23) -> str:
    """The sha256 of a file, read in 8 MiB chunks (`hashlib.file_digest` needs Python 3.11)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read(memo_path: Path) -> dict:
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}
