"""All-or-nothing writes: a file or directory appears complete, or not at all."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, then deliver them, so a pair of renames is never split.

    Only the main thread can install signal handlers; elsewhere the block runs unprotected.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.getsignal(s) for s in DEFERRED_SIGNALS}
    held = [s for s, h in previous.items() if h is not None]
    for s in held:
        signal.signal(s, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        for s in held:
            signal.signal(s, previous[s])
        if caught:
            signal.raise_signal(caught[0])


def write_text(path: Path, text: str) -> None:
    """Write `path` through a temporary sibling and a rename."""
    tmp = path.with_name(f".{path.name}.kvconvert-tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def swap_into_place(tmp: Path, output: Path) -> None:
    """Rename the finished directory `tmp` to `output`, replacing an old `output` only at the very end.

    The two renames run with interrupts held, so `output` is always either the old or the new directory.
    """
    old = output.parent / f".{output.name}.kvconvert-old"
    shutil.rmtree(old, ignore_errors=True)
    with deferred_interrupts():
        replaced = output.exists()
        if replaced:
            output.rename(old)
        os.replace(tmp, output)
    if replaced:
        shutil.rmtree(old, ignore_errors=True)
