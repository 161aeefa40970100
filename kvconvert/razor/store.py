"""The retrieval-head profile on disk: a JSON file, and inside a checkpoint without breaking stock loading.

In a checkpoint directory the profile goes to two places: `config.json` gains the key `kvconvert_razor`
(retrieval heads and runtime settings; stock `from_pretrained` keeps unknown keys as plain attributes and
ignores them) and `kvconvert.json` gains the section `razor_profile` (the whole profile, scores included).
"""

from __future__ import annotations

import json
from pathlib import Path

from kvconvert.card import add_section
from kvconvert.errors import KVConvertError
from kvconvert.io.staging import read_json, staged, write_text

SCHEMA = "kvconvert-razor-profile/1"
CONFIG_KEY = "kvconvert_razor"
RECORD_SECTION = "razor_profile"
RUNTIME_DEFAULTS = {"sinks": 4, "window_floor": 256, "window_fraction": 0.1, "compensation": True}


def save_profile(profile: dict, path: Path, *, overwrite: bool = False, inputs: tuple[Path, ...] = ()) -> None:
    """Write the profile JSON; an existing file is replaced only with `overwrite`, an input never."""
    with staged(path, overwrite=overwrite, directory=False, inputs=inputs) as tmp:
        tmp.write_text(json.dumps(profile, indent=1) + "\n")


def load_profile(spec: str | Path) -> dict:
    """A profile from a JSON file, or from a checkpoint directory that holds one."""
    path = Path(spec).expanduser()
    if path.is_dir():
        config = path / "config.json"
        data = json.loads(config.read_text()).get(CONFIG_KEY) if config.is_file() else None
        if not data:
            raise KVConvertError(f"{path} holds no retrieval profile; run `kvconvert profile {path} --attach`")
        return data
    if not path.is_file():
        raise KVConvertError(f"no profile at {path}; make one with `kvconvert profile MODEL --output {path}`")
    profile = read_json(path, "make it again with `kvconvert profile`")
    if not isinstance(profile, dict) or profile.get("schema") != SCHEMA or "retrieval" not in profile:
        raise KVConvertError(f"{path} is not a kvconvert retrieval profile (schema {SCHEMA})")
    return profile


def config_entry(profile: dict) -> dict:
    """The compact part stored in config.json."""
    return {"schema": SCHEMA, "retrieval": profile["retrieval"], "runtime": profile.get("runtime", RUNTIME_DEFAULTS)}


def profile_of_config(*configs) -> dict:
    """The profile a loaded model's config carries (the first config that has one)."""
    for config in configs:
        data = getattr(config, CONFIG_KEY, None)
        if data:
            return data
    raise KVConvertError("the model carries no retrieval profile; pass one: --cache razor:PROFILE.json")


def attach_profile(checkpoint: Path, profile: dict) -> None:
    """Store `profile` in a checkpoint directory: config.json key + kvconvert.json section (created if absent)."""
    config_path = checkpoint / "config.json"
    if not config_path.is_file():
        raise KVConvertError(f"{checkpoint} is not a checkpoint directory (no config.json)")
    config = json.loads(config_path.read_text())
    if config.get("num_hidden_layers") not in (None, len(profile["retrieval"])):
        raise KVConvertError(f"the profile has {len(profile['retrieval'])} layers, {checkpoint} has another count")
    config[CONFIG_KEY] = config_entry(profile)
    write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    add_section(checkpoint, **{RECORD_SECTION: profile})


def protected_heads(profile: Path, geom, n_new: int, grouping: str) -> list[list[int]]:
    """The retrieval KV heads per layer of a `kvconvert profile` file, checked against this model's layers and
    KV heads (before any long work: a profile of another model is one line, not an IndexError after calibrating).
    Only the grouping search of a count that divides the KV heads weighs them; elsewhere the option is refused,
    not ignored."""
    if grouping != "search" or geom.num_kv_heads % n_new:
        raise KVConvertError(
            f"--protect-retrieval steers --grouping search when the new count divides the current KV heads; "
            f"{geom.num_kv_heads} -> {n_new} KV heads with --grouping {grouping} would ignore it: drop it, or pick "
            "a count that divides the KV heads"
        )

    retrieval = load_profile(profile)["retrieval"]
    if not isinstance(retrieval, list) or len(retrieval) != geom.num_layers:
        count = len(retrieval) if isinstance(retrieval, list) else "no"
        raise KVConvertError(
            f"--protect-retrieval {profile} lists {count} layers of retrieval heads; this model has "
            f"{geom.num_layers}: profile this model (`kvconvert profile MODEL`)"
        )
    for layer, heads in enumerate(retrieval):
        listed = heads if isinstance(heads, list) else [heads]
        bad = [h for h in listed if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < geom.num_kv_heads]
        if bad:
            raise KVConvertError(
                f"--protect-retrieval {profile} names KV head {bad[0]!r} in layer {layer}; this "
                f"model has KV heads 0-{geom.num_kv_heads - 1}: profile this model (`kvconvert profile MODEL`)"
            )
    return [heads if isinstance(heads, list) else [heads] for heads in retrieval]
