"""KV-cache runtimes for stock transformers models (importable without the CLI).

`runtime_for("razor[:PROFILE]", model)` (or `"matryoshka:DIR"`) returns a runtime; `runtime.attach(model)`
selects its attention function and `runtime.new_cache(model, batch)` gives the `Cache` to pass to
`model.generate(past_key_values=...)`.
"""

from kvconvert.runtime.registry import RUNTIMES, CacheRuntime, runtime_for

__all__ = ["RUNTIMES", "CacheRuntime", "runtime_for"]
