"""One streaming safetensors writer: the header is computed from shapes and dtypes, then each tensor is written as
soon as it is produced, so memory holds one tensor (or one layer) whatever the file size.

The bytes are those of `safetensors.torch.save_file` for the same tensors and metadata (same header, same order:
larger dtypes first, then by name), so files are byte-identical to what the library writes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards

DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64"]
ORDER += ["U64"]
"""safetensors' own dtype order; tensors are laid out by it (descending), then by name."""

INDEX = "model.safetensors.index.json"

Spec = tuple[torch.dtype, tuple[int, ...]]


def spec_of(t: torch.Tensor) -> Spec:
    return t.dtype, tuple(t.shape)


def nbytes(spec: Spec) -> int:
    dtype, shape = spec
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def layout(specs: Mapping[str, Spec]) -> list[str]:
    """Names in the order safetensors lays their bytes out."""
    return sorted(specs, key=lambda n: (-ORDER.index(DTYPE_CODES[specs[n][0]]), n))


def header_bytes(
    specs: Mapping[str, Spec], metadata: Mapping[str, str] | None = None, order: list[str] | None = None
) -> bytes:
    """The 8-byte length and the space-padded JSON header for tensors of `specs`, laid out in `order` (default:
    safetensors' own)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in order or layout(specs):
        size = nbytes(specs[name])
        dtype, shape = specs[name]
        header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    blob += b" " * (-(len(blob) + 8) % 8)
    return len(blob).to_bytes(8, "little") + blob


def raw_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes (little-endian, C order) without a copy when it is already contiguous on the CPU."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


class SafetensorsWriter:
    """Writes one safetensors file; `add` each tensor in layout order (checked against the header).

    The layout is safetensors' own unless `in_given_order` (then the order of `specs`: still a valid file, read
    the same by every reader, but not byte-identical to `save_file`).
    """

    def __init__(
        self,
        path: Path,
        specs: Mapping[str, Spec],
        metadata: Mapping[str, str] | None = None,
        *,
        in_given_order: bool = False,
    ):
        self.path, self.specs = Path(path), dict(specs)
        self._order = list(self.specs) if in_given_order else layout(self.specs)
        self._next = 0
        self._file = open(self.path, "wb")  # noqa: SIM115  (closed in close()/abort())
        self._file.write(header_bytes(self.specs, metadata, self._order))

    @property
    def pending(self) -> list[str]:
        """Names still to write, in the order they must come."""
        return self._order[self._next :]

    def add(self, name: str, t: torch.Tensor) -> None:
        want = self._order[self._next] if self._next < len(self._order) else None
        if name != want:
            raise ValueError(f"tensor {name} written out of order (expected {want})")
        if spec_of(t) != self.specs[name]:
            raise ValueError(f"tensor {name} is {spec_of(t)}, the header says {self.specs[name]}")
        self._file.write(raw_bytes(t))
        self._next += 1

    def close(self) -> None:
        """Flush to disk; every tensor must have been written."""
        try:
            if self._next != len(self._order):
                raise ValueError(f"{self.path} incomplete: {self._next} of {len(self._order)} tensors written")
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()

    def abort(self) -> None:
        self._file.close()


def write_safetensors(
    path: Path,
    specs: Mapping[str, Spec],
    produce: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write one file, asking `produce(name)` for each tensor in layout order; returns the bytes of tensor data."""
    writer = SafetensorsWriter(path, specs, metadata)
    try:
        for name in writer.pending:
            writer.add(name, produce(name))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return sum(nbytes(s) for s in specs.values())


@dataclass(frozen=True)
class ShardPlan:
    """Which tensor goes to which file: Hugging Face's own split (`model-0000i-of-0000n.safetensors` + index)."""

    files: dict[str, list[str]]
    sharded: bool

    @classmethod
    def split(cls, specs: Mapping[str, Spec], max_shard_size: int | str = "5GB") -> ShardPlan:
        metas = {n: torch.empty(shape, dtype=dtype, device="meta") for n, (dtype, shape) in specs.items()}
        split = split_torch_state_dict_into_shards(
            metas, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
        )
        return cls({f: list(names) for f, names in split.filename_to_tensors.items()}, split.is_sharded)

    @classmethod
    def of_files(cls, files: Mapping[str, list[str]]) -> ShardPlan:
        """A given assignment (e.g. one output file per input file)."""
        return cls({f: list(names) for f, names in files.items()}, len(files) > 1)


def write_shards(
    directory: Path,
    specs: Mapping[str, Spec],
    produce: Callable[[str], torch.Tensor],
    plan: ShardPlan,
    *,
    on_shard: Callable[[str], None] | None = None,
    total_size: bool = True,
) -> int:
    """Write every shard of `plan` into `directory` (plus the index when sharded), streaming tensor by tensor."""
    written = 0
    weight_map = {}
    for filename, names in plan.files.items():
        written += write_safetensors(directory / filename, {n: specs[n] for n in names}, produce, {"format": "pt"})
        weight_map |= dict.fromkeys(names, filename)
        if on_shard is not None:
            on_shard(filename)
    if plan.sharded:
        write_index(directory, weight_map, written if total_size else None)
    return written


def write_index(directory: Path, weight_map: Mapping[str, str], total_size: int | None) -> None:
    """`model.safetensors.index.json`: tensor name -> shard file (and the total tensor bytes when known)."""
    meta = {"total_size": total_size} if total_size is not None else {}
    index = {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
