"""Progress reporting for long stages: silent in the library by default, rich bars from the CLI."""

from __future__ import annotations

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


class RichProgress(AbstractContextManager):
    """Bars with rate and ETA on stderr."""

    def __init__(self, enabled: bool = True) -> None:
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
        self._enabled = enabled
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
        tid = self._bars.add_task(description, total=total, info="")

        def advance(n=1, info: str | None = None) -> None:
            self._bars.update(tid, advance=n, **({} if info is None else {"info": info}))

        return advance

    def log(self, message: str) -> None:
        if self._enabled:
            self._bars.console.print(message)
