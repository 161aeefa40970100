"""Cache fills that several processes may race on (torchrun ranks with a cold cache): one builds, the rest wait."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from kvconvert.io.staging import default_modes, swap_into_place, temporary_of

COMPLETE = "config.json"
"""A cached checkpoint is complete when its config.json exists (it is renamed into place last, with the folder)."""


def locked_fill(target: Path, build: Callable[[Path], None]) -> Path:
    """`target`, built once by `build(tmp_dir)` under a file lock; other processes wait and reuse it."""
    if (target / COMPLETE).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{target.name}.lock"):
        if (target / COMPLETE).exists():  # another process filled it while we waited
            return target
        tmp = temporary_of(target)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)  # incomplete leftovers
        tmp.mkdir()
        try:
            build(tmp)
            default_modes(tmp)
            swap_into_place(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
