"""The merge-method registry. A method is one module in `kvconvert/merge/methods/` that defines `METHOD` (modules
named `_*` are helpers, not methods).

Names are found from the package's files without importing them (so the CLI and configs stay light); a method
is imported when it is used.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

PACKAGE = "kvconvert.merge.methods"
DEFAULT = "weighted"


def names() -> tuple[str, ...]:
    """Every registered method, the default first."""
    modules = pkgutil.iter_modules([str(Path(__file__).parent / "methods")])
    found = sorted(m.name for m in modules if not m.name.startswith("_"))
    return tuple(sorted(found, key=lambda n: n != DEFAULT))


def get(name: str):
    """The `Method` registered as `name`."""
    if name not in names():
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(names())}")
    return importlib.import_module(f"{PACKAGE}.{name}").METHOD
