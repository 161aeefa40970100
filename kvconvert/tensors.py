"""Lazy, validated access to the tensors of a safetensors checkpoint (one file, or shards with an index)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from kvconvert.errors import KVConvertError

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


SHARD_NAME = re.compile(r"model-\d+-of-\d+\.safetensors")
NOT_WEIGHTS = ("adapter_model.safetensors",)


def weight_files(directory: Path) -> list[str]:
    """The weight files of a checkpoint without an index: `model.safetensors`, else `model-i-of-n` shards, else
    every other `*.safetensors` that is neither an adapter nor a kvconvert statistics file."""
    if (directory / "model.safetensors").is_file():
        return ["model.safetensors"]
    shards = sorted(p.name for p in directory.glob("*.safetensors") if SHARD_NAME.fullmatch(p.name))
    if shards:
        return shards
    return [p.name for p in sorted(directory.glob("*.safetensors")) if p.name not in NOT_WEIGHTS and not _stats(p)]


def _stats(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == "kvconvert-stats"
    except Exception:  # unreadable: let the reader report it as a damaged shard
        return False


class TensorReader:
    """Lazy access to the tensors of a safetensors checkpoint (single file or sharded with an index).

    Files are opened per read: tensors come back backed by the file mapping, and closing the handle lets each
    mapping go with its tensor, so pages read once do not stay resident for the whole run.
    """

    def __init__(self, directory: Path):
        """Open every shard once (a missing, truncated or corrupt shard fails here, before any work)."""
        self.directory = directory
        index = directory / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise KVConvertError(f"{index} is not a valid shard index ({exc}); re-download it") from exc
            files = sorted(set(weight_map.values()))
        else:
            files = weight_files(directory)
            if not files:
                raise KVConvertError(f"no *.safetensors weights in {directory}; point MODEL at a complete checkpoint")
            weight_map = {}
        for name in files:
            with self._open(name) as f:
                keys = set(f.keys())
            if not index.exists():
                weight_map |= dict.fromkeys(sorted(keys), name)
                continue
            absent = [t for t, shard in weight_map.items() if shard == name and t not in keys]
            if absent:
                raise KVConvertError(f"shard {directory / name} lacks {absent[0]} that the index lists; re-download it")
        self.weight_map: dict[str, str] = weight_map

    def _open(self, filename: str):
        if not (self.directory / filename).is_file():
            raise KVConvertError(f"shard {self.directory / filename} listed in the index is missing; re-download it")
        try:
            return safe_open(str(self.directory / filename), framework="pt")
        except Exception as exc:  # safetensors raises its own error types
            raise KVConvertError(f"cannot read shard {self.directory / filename}: {exc}; re-download it") from exc

    def names(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _slice(self, name: str):
        if name not in self.weight_map:
            raise KVConvertError(f"tensor {name} is missing from the checkpoint")
        return self._open(self.weight_map[name])

    def get(self, name: str) -> torch.Tensor:
        with self._slice(name) as f:
            try:
                return f.get_tensor(name)
            except Exception as exc:
                raise KVConvertError(f"cannot read tensor {name} from {self.weight_map[name]}: {exc}") from exc

    def shape(self, name: str) -> list[int]:
        with self._slice(name) as f:
            return list(f.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        with self._slice(name) as f:
            code = f.get_slice(name).get_dtype()
        if code not in SAFETENSORS_DTYPES:
            raise KVConvertError(
                f"tensor {name} of {self.directory} is stored as {code}, which kvconvert cannot convert (a quantized "
                "checkpoint?); use a bfloat16, float16 or float32 copy"
            )
        return SAFETENSORS_DTYPES[code]

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        with self._slice(name) as f:
            return f.get_slice(name)[start:stop]
