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
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from kvconvert.errors import KVConvertError
from kvconvert.filemodes import use_umask

PICKLE_INDEX = "pytorch_model.bin.index.json"


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
        raise KVConvertError(f"cannot read pickle shard {path}: {str(exc).splitlines()[0]}; re-download it") from exc
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
    """A cached safetensors copy of the pickle checkpoint `directory` (built once; keyed by path, sizes, mtimes).

    `tied` names tensors that may be dropped when they share storage with another (tied output embeddings).
    """
    files = pickle_weights(directory)
    parts = [str(directory.resolve())]
    for name in files:
        st = (directory / name).stat() if (directory / name).exists() else None
        parts.append(f"{name}:{st.st_size if st else -1}:{st.st_mtime_ns if st else -1}")
    key = hashlib.sha1(";".join(parts).encode()).hexdigest()[:12]
    target = cache / "pickle" / f"{directory.name}-{key}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        weight_map: dict[str, str] = {}
        for i, name in enumerate(files):
            shard = "model.safetensors" if len(files) == 1 else f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            state = unshare(load_pickle_shard(directory / name), tied)
            save_file(state, str(tmp / shard), metadata={"format": "pt"})
            weight_map |= dict.fromkeys(state, shard)
            del state
        if len(files) > 1:
            index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for path in [directory / "config.json", *side_files]:
            shutil.copyfile(path, tmp / path.name)
        use_umask(tmp)  # mkdtemp is 0700 and safetensors writes 0600
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
