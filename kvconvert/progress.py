"""Progress reporting for long stages: silent in the library by default; from the CLI, rich bars on a terminal and
plain log lines (one per stage, then one every ~10 s: done/total, rate, ETA) when stderr is a file or a pipe."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol, TextIO

Advance = Callable[..., None]

LOG_INTERVAL = 10.0
"""Seconds between plain progress lines of one long loop."""


class Progress(Protocol):
    def task(self, description: str, total: int | None) -> Advance:
        """Start a bar; the returned callable advances it (by 1 unless given a count; `info=` sets status text)."""
        ...

    def log(self, message: str) -> None: ...


class Silent:
    """No output."""

    def task(self, description: str, total: int | None) -> Advance:
        return lambda n=1, info=None: None

    def log(self, message: str) -> None:
        pass


def clock(seconds: float) -> str:
    """h:mm:ss or m:ss."""
    s = round(seconds)
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class PlainProgress:
    """Progress as plain lines, for logs: every `interval` seconds while a stage runs (done/total, rate, ETA) and
    when it completes, unless it took under `quiet_below` seconds. Nothing when it starts: stages that fail or
    finish at once leave a failing command with just its one error line."""

    def __init__(
        self,
        stream: TextIO | None = None,
        interval: float = LOG_INTERVAL,
        now: Callable[[], float] = time.monotonic,
        quiet_below: float = 2.0,
    ) -> None:
        self._stream = stream
        self._quiet_below = quiet_below
        self._interval = interval
        self._now = now

    def _print(self, line: str) -> None:
        stream = self._stream or sys.stderr
        print(line, file=stream, flush=True)

    def task(self, description: str, total: int | None) -> Advance:
        start = self._now()
        state = {"done": 0, "last": start, "info": "", "finished": False}

        def advance(n: int = 1, info: str | None = None) -> None:
            state["done"] += n
            if info is not None:
                state["info"] = info
            now = self._now()
            done, elapsed = state["done"], now - start
            finished = total is not None and done >= total
            if finished and not state["finished"]:
                state["finished"] = True
                if elapsed < self._quiet_below and state["last"] == start:
                    return  # a stage this short needs no log line (and a failing command keeps its one line)
                rate = f", {done / elapsed:,.1f}/s" if elapsed > 0 else ""
                self._print(f"{description}: done, {done:,}/{total:,} in {clock(elapsed)}{rate}{self._info(state)}")
            elif not finished and now - state["last"] >= self._interval:
                state["last"] = now
                self._print(f"{description}: {self._status(done, total, elapsed)}{self._info(state)}")

        return advance

    @staticmethod
    def _info(state: dict) -> str:
        return f" ({state['info']})" if state["info"] else ""

    @staticmethod
    def _status(done: int, total: int | None, elapsed: float) -> str:
        rate = done / elapsed if elapsed > 0 else 0.0
        if not total:
            return f"{done:,} in {clock(elapsed)}, {rate:,.1f}/s"
        eta = clock((total - done) / rate) if rate > 0 else "?"
        return f"{done:,}/{total:,} ({100 * done / total:.0f}%) in {clock(elapsed)}, {rate:,.1f}/s, ETA {eta}"

    def log(self, message: str) -> None:
        self._print(message)


class RichProgress(AbstractContextManager):
    """Bars with rate and ETA on stderr when it is a terminal; `PlainProgress` lines when it is not."""

    def __init__(self, enabled: bool = True, line_every: float = LOG_INTERVAL) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as _Progress

        from kvconvert.console import make_console

        self._console = make_console(stderr=True)
        self._enabled = enabled
        self._plain = PlainProgress(interval=line_every) if enabled and not self._console.is_terminal else None
        self._started = False
        self._bars = _Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}", markup=False),
            console=self._console,
            transient=False,
            disable=not enabled or self._plain is not None,
        )

    def __enter__(self) -> RichProgress:
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if not self._started:
            return
        if exc_type is not None:  # an error line follows: do not leave half-drawn bars above it
            self._bars.live.transient = True
        self._bars.__exit__(exc_type, *rest)

    def _start(self) -> None:
        """Start drawing at the first bar, so a run that fails before any bar draws nothing at all."""
        if not self._started:
            self._started = True
            self._bars.__enter__()

    def task(self, description: str, total: int | None) -> Advance:
        if self._plain is not None:
            return self._plain.task(description, total)
        self._start()
        tid = self._bars.add_task(description, total=total, info="")

        def advance(n=1, info: str | None = None) -> None:
            self._bars.update(tid, advance=n, **({} if info is None else {"info": info}))

        return advance

    def log(self, message: str) -> None:
        if self._plain is not None:
            self._plain.log(message)
        elif self._enabled:
            self._bars.console.print(message)
