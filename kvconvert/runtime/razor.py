"""The `razor` runtime: a `RazorPolicy` from a retrieval-head profile, served on a stock transformers model."""

from __future__ import annotations

from dataclasses import dataclass

from kvconvert.errors import KVConvertError, first_line
from kvconvert.evaluation.kvcache import sliding_windows
from kvconvert.runtime.razor_attention import register
from kvconvert.runtime.razor_cache import RazorCache
from kvconvert.runtime.razor_policy import RazorPolicy


def _attn_config(model):
    config = model.config
    return getattr(config, "get_text_config", lambda: config)()


def _kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def policy_for(model, retrieval: list[list[int]], **rule) -> RazorPolicy:
    """A policy for `model`: its shape from the config; sliding-window layers keep their own window only."""
    config = _attn_config(model)
    n_kv = _kv_heads(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    # as transformers lays its own cache out: a `sliding_window` without `layer_types` (Mistral) slides every layer
    fixed = tuple(sliding_windows(config))
    if len(retrieval) != config.num_hidden_layers:
        raise ValueError(f"profile has {len(retrieval)} layers, the model {config.num_hidden_layers}")
    return RazorPolicy(tuple(tuple(r) for r in retrieval), n_kv, head_dim, fixed_window=fixed, **rule)


@dataclass
class RazorRuntime:
    """Implements `kvconvert.runtime.registry.CacheRuntime` for a `RazorPolicy`."""

    policy: RazorPolicy
    num_query_heads: int
    dtype_bytes: int
    name: str = "razor"

    def attach(self, model) -> None:
        """Register the `razor` attention function and select it on `model` (SDPA whenever no RazorCache is used)."""
        model.set_attn_implementation(register())

    def new_cache(self, model=None, batch_size: int = 1) -> RazorCache:
        """An empty cache (its tensors are shaped by the first update, so `batch_size` is informational)."""
        return RazorCache(self.policy, self.num_query_heads)

    def kv_bytes(self, tokens: int, batch_size: int = 1) -> int:
        return self.policy.kv_bytes(tokens, batch_size, self.dtype_bytes)


def runtime_from_policy(model, policy: RazorPolicy) -> RazorRuntime:
    config = _attn_config(model)
    return RazorRuntime(policy, config.num_attention_heads, next(model.parameters()).element_size())


def razor_runtime(model, arg: str | None) -> RazorRuntime:
    """`razor[:PROFILE]`: PROFILE is a profile JSON or a checkpoint holding one; none: the model's own profile."""
    from kvconvert.razor.store import load_profile, profile_of_config

    profile = load_profile(arg) if arg else profile_of_config(_attn_config(model), model.config)
    source = arg or "the model's own profile"
    config = _attn_config(model)
    made_for = {"num_layers": config.num_hidden_layers, "num_kv_heads": _kv_heads(config)}
    for key, value in made_for.items():
        if key in profile and profile[key] != value:
            raise KVConvertError(
                f"{source} was made for a model with {key} = {profile[key]}, this one has {value}; "
                "profile this model: kvconvert profile MODEL --output PROFILE.json"
            )
    try:
        policy = policy_for(model, profile["retrieval"], **profile.get("runtime", {}))
    except (TypeError, ValueError) as exc:  # another model's profile, or a runtime rule this version does not know
        raise KVConvertError(f"{source} does not fit this model: {first_line(exc)}") from None
    return runtime_from_policy(model, policy)
