"""Progress reporting for long stages: silent in the library by default, rich bars from the CLI."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

Advance = Callable[..., None]


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


class _LineTicker:
    """Progress as plain lines (when stderr is no terminal), for long stages only: one line per `every` seconds,
    and a last one at the end if any was printed (a short stage, or one that fails fast, prints nothing)."""

    def __init__(self, console, description: str, total: int | None, every: float) -> None:
        self._console, self._description, self._total, self._every = console, description, total, every
        self._done, self._t0, self._printed = 0, time.monotonic(), False
        self._last = self._t0

    def __call__(self, n=1, info: str | None = None) -> None:
        self._done += n
        now = time.monotonic()
        finished = self._total is not None and self._done >= self._total
        if now - self._last >= self._every or (finished and self._printed):
            self._last, self._printed = now, True
            of = f"/{self._total}" if self._total is not None else ""
            extra = f" {info}" if info else ""
            self._console.print(
                f"{self._description} {self._done}{of} ({now - self._t0:.1f} s){extra}", highlight=False
            )


class RichProgress(AbstractContextManager):
    """Bars with rate and ETA on stderr."""

    def __init__(self, enabled: bool = True, line_every: float = 5.0) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as _Progress

        self._console = Console(stderr=True)
        self._enabled, self._line_every = enabled, line_every
        self._bars = _Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=self._console,
            transient=False,
            disable=not enabled,
        )

    def __enter__(self) -> RichProgress:
        self._bars.__enter__()
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is not None:  # an error line follows: do not leave half-drawn bars above it
            self._bars.live.transient = True
        self._bars.__exit__(exc_type, *rest)

    def task(self, description: str, total: int | None) -> Advance:
        if self._enabled and not self._console.is_terminal:  # logs and pipes: bars never draw, print lines
            return _LineTicker(self._console, description, total, self._line_every)
        tid = self._bars.add_task(description, total=total, info="")

        def advance(n=1, info: str | None = None) -> None:
            self._bars.update(tid, advance=n, **({} if info is None else {"info": info}))

        return advance

    def log(self, message: str) -> None:
        if self._enabled:
            self._bars.console.print(message)
