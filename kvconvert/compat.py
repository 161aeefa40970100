"""What differs between the transformers versions kvconvert supports, in one place."""

from __future__ import annotations

from functools import cache
from typing import Any


@cache
def _transformers_at_least(version: str) -> bool:
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) >= Version(version)


def cache_kwargs(kv_cache: Any) -> dict[str, Any]:
    """The keyword a model's `forward`/`generate` and the mask builders take the KV cache by: `cache` from
    transformers 5.24 on (where `past_key_values` still works, with a FutureWarning, until its removal), else
    `past_key_values`."""
    return {"cache" if _transformers_at_least("5.24.0") else "past_key_values": kv_cache}
