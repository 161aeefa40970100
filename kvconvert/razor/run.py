"""The `profile` stage: load a model, profile its heads, write the profile (and optionally attach it)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from kvconvert.config.profile import ProfileRunRequest
from kvconvert.errors import KVConvertError
from kvconvert.progress import Progress, Silent
from kvconvert.razor.ablation import profile_ablation
from kvconvert.razor.profile import ProfileSettings, profile_model
from kvconvert.razor.store import SCHEMA, attach_profile, save_profile
from kvconvert.runtime.razor_policy import window


def eligible_heads(config, n_kv: int) -> torch.Tensor:
    """(layer, KV head) that may be retrieval heads: not in sliding-window layers."""
    from kvconvert.evaluation.kvcache import sliding_windows

    return torch.tensor([[w is None] * n_kv for w in sliding_windows(config)], dtype=torch.bool)


def _echo_induction(model, req: ProfileRunRequest, eligible: torch.Tensor, progress: Progress) -> tuple[dict, dict]:
    seeds = tuple(range(req.seed_count()))
    s = ProfileSettings(
        block=req.block, repeats=req.repeats, seeds=seeds, induction_fraction=req.induction, echo_fraction=req.echo
    )
    settings = {"scoring": req.scoring, "block": req.block, "repeats": req.repeats, "prefix": s.prefix}
    settings |= {"queries": s.queries, "seeds": list(seeds), "induction_fraction": req.induction}
    advance = progress.task(f"profile: attention over {s.prefix + s.block * s.repeats} tokens, per seed", len(seeds))
    return settings | {"echo_fraction": req.echo}, profile_model(model, s, eligible, advance)


def _ablation(model, req: ProfileRunRequest, eligible: torch.Tensor, progress: Progress) -> tuple[dict, dict]:
    rule = req.runtime_rule() | {"sinks": req.probe_sinks}  # the probe's windowing; the cache keeps req.sinks
    prefix = max(8, req.probe_sinks)  # the sinks see the random prefix only, never the block to be copied
    if req.block <= window(rule["window_floor"], rule["window_fraction"], req.block * req.repeats + prefix):
        raise KVConvertError("ablation scoring needs --block longer than the runtime's window (--window-floor)")
    kw = dict(block=req.block, repeats=req.repeats, seeds=req.seed_count(), fraction=req.retrieval, prefix=prefix)
    kw |= dict(rounds=req.rounds, pool=req.pool, greedy=req.scoring == "ablation")
    settings = {"scoring": req.scoring, **kw, "seeds": list(range(req.seed_count())), "probe_sinks": req.probe_sinks}
    return settings, profile_ablation(model, eligible, rule, **kw, progress=progress)


def run_profile(req: ProfileRunRequest, progress: Progress | None = None) -> dict:
    """Profile `req.model`'s heads, write the profile to `req.output` (with the runtime's window rule) and, with
    `req.attach`, store it in the model's own directory too."""
    from kvconvert.checkpoint import resolve
    from kvconvert.modeling import load_model, resolve_device, resolve_dtype

    if req.attach and not Path(req.model).expanduser().is_dir():  # before the minutes of profiling, not after
        raise KVConvertError(
            f"--attach stores the profile in MODEL's own directory, and {req.model} is not a checkpoint directory "
            "(its files are a cache kvconvert or the Hub keeps); profile without --attach and pass the file: "
            "--cache razor:PROFILE.json"
        )
    ckpt = resolve(req.model, progress=progress)
    dev = resolve_device(req.device)
    model = load_model(ckpt, dev, resolve_dtype(req.dtype, dev))
    config = model.config.get_text_config()
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    eligible = eligible_heads(config, n_kv)
    t0 = time.perf_counter()
    if req.scoring != "echo-induction":
        settings, scores = _ablation(model, req, eligible, progress or Silent())
    else:
        settings, scores = _echo_induction(model, req, eligible, progress or Silent())
    profile = {
        "schema": SCHEMA,
        "model": req.model,
        "num_layers": config.num_hidden_layers,
        "num_kv_heads": n_kv,
        "num_attention_heads": config.num_attention_heads,
        "settings": settings | {"seconds": round(time.perf_counter() - t0, 1)},
        "runtime": req.runtime_rule(),
        **scores,
    }
    model_files = tuple(p for p in Path(ckpt.path).iterdir() if p.is_file())  # a new file beside them is fine
    save_profile(profile, req.output, overwrite=req.overwrite, inputs=model_files)
    if req.attach:
        attach_profile(Path(ckpt.path), profile)
    return profile
