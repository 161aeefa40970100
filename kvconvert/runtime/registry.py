"""Registry of KV-cache runtimes: `runtime_for("razor:PROFILE.json", model)` -> an object that serves a stock model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from kvconvert.errors import KVConvertError


class CacheRuntime(Protocol):
    """A KV-cache policy served through transformers' public `Cache` and `AttentionInterface`."""

    name: str

    def attach(self, model) -> None:
        """Register/select the attention function on a stock model."""
        ...

    def new_cache(self, model, batch_size: int):
        """An empty `transformers.Cache` subclass instance for `batch_size` sequences."""
        ...

    def kv_bytes(self, tokens: int, batch_size: int = 1) -> int:
        """Computed bytes the policy keeps after `tokens` tokens."""
        ...


def _razor(model, arg: str | None) -> CacheRuntime:
    from kvconvert.runtime.razor import razor_runtime

    return razor_runtime(model, arg)


def _matryoshka(model, arg: str | None) -> CacheRuntime:
    from kvconvert.runtime.matryoshka import matryoshka_runtime

    return matryoshka_runtime(model, arg)


RUNTIMES: dict[str, Callable[[Any, str | None], CacheRuntime]] = {"razor": _razor, "matryoshka": _matryoshka}


def runtime_for(spec: str, model) -> CacheRuntime:
    """Parse `kind[:arg]` and build that runtime for `model`."""
    kind, _, arg = spec.partition(":")
    if kind not in RUNTIMES:
        raise KVConvertError(f"unknown cache runtime {kind!r}; choose from {', '.join(sorted(RUNTIMES))}")
    return RUNTIMES[kind](model, arg or None)
