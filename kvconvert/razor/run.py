"""The `profile` stage: load a model, profile its heads, write the profile (and optionally attach it)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from kvconvert.config.profile import ProfileRunRequest
from kvconvert.razor.profile import ProfileSettings, profile_model
from kvconvert.razor.store import SCHEMA, attach_profile, save_profile


def eligible_heads(config, n_kv: int) -> torch.Tensor:
    """(layer, KV head) that may be retrieval heads: not in sliding-window layers."""
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return torch.tensor([[t != "sliding_attention"] * n_kv for t in types], dtype=torch.bool)


def run_profile(req: ProfileRunRequest) -> dict:
    """Profile `req.model`'s heads, write the profile to `req.output` (with the runtime's window rule) and, with
    `req.attach`, store it in the model's own directory too."""
    from kvconvert.checkpoint import resolve
    from kvconvert.modeling import load_model, resolve_device, resolve_dtype

    ckpt = resolve(req.model)
    dev = resolve_device(req.device)
    model = load_model(ckpt, dev, resolve_dtype(req.dtype, dev))
    config = model.config.get_text_config()
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    seeds = tuple(range(req.seeds))
    settings = ProfileSettings(
        block=req.block, repeats=req.repeats, seeds=seeds, induction_fraction=req.induction, echo_fraction=req.echo
    )
    t0 = time.perf_counter()
    scores = profile_model(model, settings, eligible_heads(config, n_kv))
    profile = {
        "schema": SCHEMA,
        "model": req.model,
        "num_layers": config.num_hidden_layers,
        "num_kv_heads": n_kv,
        "num_attention_heads": config.num_attention_heads,
        "settings": {
            "block": req.block,
            "repeats": req.repeats,
            "prefix": settings.prefix,
            "queries": settings.queries,
            "seeds": list(seeds),
            "induction_fraction": req.induction,
            "echo_fraction": req.echo,
            "seconds": round(time.perf_counter() - t0, 1),
        },
        "runtime": req.runtime_rule(),
        **scores,
    }
    model_files = tuple(p for p in Path(ckpt.path).iterdir() if p.is_file())  # a new file beside them is fine
    save_profile(profile, req.output, overwrite=req.overwrite, inputs=model_files)
    if req.attach:
        attach_profile(Path(ckpt.path), profile)
    return profile
