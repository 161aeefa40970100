"""Pickle (`pytorch_model*.bin`) checkpoints: refused unless asked for, then read with `torch.load(weights_only=True)`.

A pickle can run arbitrary code when loaded, so kvconvert reads only safetensors by default. With `--allow-pickle`
the `.bin` shards are loaded with `weights_only=True` (which refuses anything but tensors and plain containers) and
copied once into a cached safetensors checkpoint that the rest of kvconvert reads like any other.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import torch

from kvconvert.errors import KVConvertError, first_line
from kvconvert.io.cache import locked_fill
from kvconvert.io.digest import file_digest
from kvconvert.io.shards import spec_of, write_index, write_safetensors

PICKLE_INDEX = "pytorch_model.bin.index.json"
PT = {"format": "pt"}


def pickle_weights(directory: Path) -> list[str]:
    """The `.bin` weight files of a Hugging Face checkpoint directory (from its index when sharded)."""
    index = directory / PICKLE_INDEX
    if index.exists():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return sorted(p.name for p in directory.glob("pytorch_model*.bin"))


def load_pickle_shard(path: Path) -> dict[str, torch.Tensor]:
    """One `.bin` shard as a flat name -> tensor dict, unpickled with `weights_only=True`."""
    if not path.is_file():
        raise KVConvertError(f"pickle shard {path} is missing; re-download the checkpoint")
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        raise KVConvertError(
            f"{path} holds Python objects besides tensors and torch.load(weights_only=True) refused it; "
            "convert it to safetensors on a machine where you trust the file"
        ) from exc
    except Exception as exc:
        raise KVConvertError(f"cannot read pickle shard {path}: {first_line(exc)}; re-download it") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise KVConvertError(f"{path} is not a flat state dict of tensors; save it with model.save_pretrained()")
    return state


def unshare(state: dict[str, torch.Tensor], drop: set[str]) -> dict[str, torch.Tensor]:
    """Tensors safe to write as safetensors: names in `drop` that share storage with another go, others are cloned."""
    seen: dict[tuple[int, int], str] = {}
    out = {}
    for name in sorted(state, key=lambda n: (n in drop, n)):
        t = state[name]
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen and t.numel():
            if name in drop:
                continue
            t = t.clone()
        else:
            seen[key] = name
        out[name] = t.contiguous()
    return dict(sorted(out.items()))


def safetensors_copy(directory: Path, cache: Path, side_files: list[Path], tied: set[str]) -> Path:
    """A cached safetensors copy of the pickle checkpoint `directory` (built once, under a lock, by one process).

    Keyed by the names and contents (`file_digest`) of the weights, config.json and `side_files` (tokenizer,
    generation files, card): an edit to any of them makes a new copy, a moved or re-downloaded checkpoint does not.
    `tied` names tensors that may be dropped when they share storage with another (tied output embeddings).
    """
    files = pickle_weights(directory)
    parts = []
    for path in [*(directory / name for name in files), directory / "config.json", *side_files]:
        parts.append(f"{path.name}:{file_digest(path, cache / 'pickle') if path.exists() else '-'}")
    key = hashlib.sha1(";".join(parts).encode()).hexdigest()[:12]

    def build(tmp: Path) -> None:
        names: dict[str, list[str]] = {}
        for i, name in enumerate(files):
            shard = "model.safetensors" if len(files) == 1 else f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            state = unshare(load_pickle_shard(directory / name), tied)
            write_safetensors(tmp / shard, {n: spec_of(t) for n, t in state.items()}, state.__getitem__, PT)
            names[shard] = list(state)
            del state
        if len(files) > 1:
            write_index(tmp, {n: shard for shard, ns in names.items() for n in ns}, None)
        for path in [directory / "config.json", *side_files]:
            shutil.copyfile(path, tmp / path.name)

    return locked_fill(cache / "pickle" / f"{directory.name}-{key}", build)
