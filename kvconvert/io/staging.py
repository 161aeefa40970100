"""All-or-nothing writes: a file or directory appears complete, or not at all, and never replaces what it must not.

Every output is written into a hidden sibling (`.NAME.kvconvert-tmp`), checked, then renamed into place with
interrupts held. A lock file beside the output (`.NAME.kvconvert-lock`) keeps a second run off the same output; a
temporary left by a killed run has the same fixed name, so the next run (holding the lock) removes it, and an old
output a killed run had set aside (`.NAME.kvconvert-old`) is moved back.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kvconvert.errors import KVConvertError

DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def temporary_of(path: Path) -> Path:
    """The hidden sibling an output is staged in."""
    return path.parent / f".{path.name}.kvconvert-tmp"


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


@contextmanager
def output_lock(path: Path) -> Iterator[None]:
    """Exclusive right to write `path`; a second holder is refused at once with one line.

    A `flock` on a hidden sibling `.NAME.kvconvert-lock`, removed on release (the kernel drops the lock of a killed
    process, and a lock file found unlinked under us counts as taken). Creating it also proves early that the
    parent directory is writable.
    """
    parent = path.parent
    lock = parent / f".{path.name}.kvconvert-lock"
    busy = f"another kvconvert run is writing {path}; wait for it to finish or choose another output"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise KVConvertError(f"cannot write to {parent}: {exc.strerror or exc}; choose another output") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KVConvertError(busy) from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # its holder just released and removed it
            raise KVConvertError(busy)
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
    finally:
        os.close(fd)


def check_not_input(output: Path, inputs: Iterable[Path]) -> None:
    """Refuse an output that equals, contains or lies inside an input (a file or a checkpoint directory)."""
    out = output.resolve()
    for src in inputs:
        src = src.resolve()
        if out == src or src in out.parents or out in src.parents:
            raise KVConvertError(f"output {output} overlaps the input {src}; choose a separate path")


def check_replaceable(output: Path, *, overwrite: bool, directory: bool) -> None:
    """Refuse to replace anything at `output` unless `overwrite` (an empty directory is not data)."""
    if directory:
        if output.exists() and not output.is_dir():
            raise KVConvertError(f"output {output} exists and is not a directory; choose another path")
        if output.is_dir() and any(output.iterdir()) and not overwrite:
            raise KVConvertError(f"output directory {output} is not empty; pass --overwrite or choose another path")
    else:
        if output.is_dir():
            raise KVConvertError(f"output {output} is a directory; name a file")
        if output.exists() and not overwrite:
            raise KVConvertError(f"output {output} already exists; pass --overwrite or choose another path")


def check_output_first(output: Path, model: str, *, overwrite: bool, directory: bool) -> None:
    """The output checks that need no resolved model, before a download or a GGUF expansion: not inside a local
    MODEL path, and nothing replaced without `overwrite` (`prepare_output`/`stats_output` check again later)."""
    local = Path(model).expanduser()
    if local.exists():
        check_not_input(output, [local])
    check_replaceable(output, overwrite=overwrite, directory=directory)


def swap_into_place(tmp: Path, output: Path) -> None:
    """Rename the finished `tmp` (file or directory) to `output`, replacing an old `output` only at the very end.

    The renames run with interrupts held, so `output` is always either the old or the new one.
    """
    if tmp.is_file():
        with deferred_interrupts():
            os.replace(tmp, output)
        return
    recover(output)
    old = output.parent / f".{output.name}.kvconvert-old"
    with deferred_interrupts():
        replaced = output.exists()
        if replaced:
            output.rename(old)
        os.replace(tmp, output)
    if replaced:
        shutil.rmtree(old, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def staged(
    output: Path, *, overwrite: bool = False, directory: bool = True, inputs: Iterable[Path] = (), locked: bool = True
) -> Iterator[Path]:
    """Stage `output`: yields a hidden temporary path to write (and check) into; renamed into place on success.

    Refuses before any work: an output overlapping an input, existing data without `overwrite`, an unwritable
    parent, a second run on the same output. On any error or interrupt the temporary goes and `output` is
    untouched. `directory=False` stages a single file (the temporary path does not exist yet).
    """
    check_not_input(output, inputs)
    check_replaceable(output, overwrite=overwrite, directory=directory)
    lock = output_lock(output) if locked else _nothing()
    with lock:
        recover(output)
        check_replaceable(output, overwrite=overwrite, directory=directory)  # it may have appeared meanwhile
        tmp = temporary_of(output)
        _remove(tmp)  # left by a killed run
        try:
            if directory:
                tmp.mkdir()
            yield tmp
            swap_into_place(tmp, output)
        except BaseException:
            _remove(tmp)
            raise


def recover(output: Path) -> None:
    """Undo what a run killed inside `swap_into_place` left: the old output set aside is moved back (or dropped
    when the new one is already in place)."""
    old = output.parent / f".{output.name}.kvconvert-old"
    if not old.exists():
        return
    if output.exists():
        _remove(old)
    else:
        old.rename(output)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def read_json(path: Path, fix: str) -> Any:
    """The JSON value in `path`; a file that does not parse is one `KVConvertError` ending with `fix`."""
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise KVConvertError(f"{path} is not valid JSON ({exc}); {fix}") from None


def write_text(path: Path, text: str) -> None:
    """Replace the text file `path` through a temporary sibling and a rename (the caller decides it may)."""
    tmp = temporary_of(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def default_modes(root: Path) -> None:
    """`default_mode` for everything under `root` (libraries' writers, safetensors among them, make 0600 files)."""
    for path in root.rglob("*"):
        default_mode(path, directory=path.is_dir())


def default_mode(path: Path, *, directory: bool = False) -> None:
    """Give `path` the permissions a plain open()/mkdir() would (tempfile makes 0600/0700 ones)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod((0o777 if directory else 0o666) & ~umask)


@contextmanager
def scratch_dir(parent: Path, prefix: str = ".kvconvert-scratch-") -> Iterator[Path]:
    """A private temporary directory in `parent` (for intermediate files too big for /tmp), removed at the end.

    Each holds a `flock` while its run lives; scratch directories whose lock is free belong to killed runs and are
    removed here first, so a SIGKILL leaves nothing that the next run does not clean.
    """
    parent.mkdir(parents=True, exist_ok=True)
    for old in parent.glob(f"{prefix}*"):
        fd = _try_lock(old / ".lock")
        if fd is not None:
            shutil.rmtree(old, ignore_errors=True)
            os.close(fd)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    fd = _try_lock(path / ".lock")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if fd is not None:
            os.close(fd)


def _try_lock(path: Path) -> int | None:
    """An fd holding `flock` on `path`, or None when another process holds it (or it cannot be made)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd
