"""The one way the CLI makes a rich console: text printed as given, whether stdout is a terminal or a log."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

LOG_WIDTH = 1000
"""Columns of a console that writes to a file or a pipe: wide enough that no line or table is wrapped or cut."""


def make_console(stderr: bool = False) -> Console:
    """A console without markup or highlighting (paths and model names may hold `[...]`, which rich would take for
    style tags and drop), and, off a terminal, without wrapping at 80 columns (a log keeps whole paths)."""
    from rich.console import Console

    console = Console(stderr=stderr, markup=False, highlight=False, emoji=False)
    if not console.is_terminal:
        console.width = LOG_WIDTH
    return console
