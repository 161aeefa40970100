"""A few metadata values of a GGUF file, read from its key-value header without loading the rest.

`gguf.GGUFReader` maps every field of the file into numpy views before anything can be read; for SmolLM2's
49k-token vocabulary that is 1.9 s per open on this project's 2-core CPU machine, paid on every run that names a
GGUF model. This walks the header once, skips what it is not asked for (fixed-size arrays by their lengths), and
stops once the asked-for keys are found. The value types are the `gguf` package's own; their struct formats are
listed here.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO


class _Header:
    """Sequential reads of a GGUF header in the file's byte order."""

    def __init__(self, fh: BinaryIO, order: str) -> None:
        import os

        self.fh, self.order, self.size = fh, order, os.fstat(fh.fileno()).st_size

    def need(self, n: int) -> None:
        """Refuse a length of `n` bytes that runs past the file's end (a damaged length must not seek or allocate
        wildly)."""
        if n > self.size - self.fh.tell():
            raise ValueError("GGUF header ends early")

    def skip(self, n: int) -> None:
        self.need(n)
        self.fh.seek(n, 1)

    def unpack(self, fmt: str) -> tuple:
        size = struct.calcsize(self.order + fmt)
        data = self.fh.read(size)
        if len(data) != size:
            raise ValueError("GGUF header ends early")
        return struct.unpack(self.order + fmt, data)

    def string(self, keep: bool = True) -> str | None:
        (n,) = self.unpack("Q")
        if not keep:
            self.skip(n)
            return None
        self.need(n)
        data = self.fh.read(n)
        if len(data) != n:
            raise ValueError("GGUF header ends early")
        return data.decode("utf-8", errors="replace")

    def value(self, kind: int, keep: bool):
        """One value of GGUF type `kind` (a list for an array); with `keep` false it is skipped, and None."""
        from gguf import GGUFValueType

        vtype = GGUFValueType(kind)
        if vtype == GGUFValueType.STRING:
            return self.string(keep)
        if vtype == GGUFValueType.ARRAY:
            item, count = self.unpack("IQ")
            fixed = _FORMATS.get(GGUFValueType(item).name)
            if not keep and fixed is not None:
                self.skip(count * struct.calcsize("<" + fixed))
                return None
            self.need(count)  # every item takes at least a byte
            items = [self.value(item, keep) for _ in range(count)]
            return items if keep else None
        (raw,) = self.unpack(_FORMATS[vtype.name])
        return raw if keep else None


_FORMATS = {
    "UINT8": "B",
    "INT8": "b",
    "UINT16": "H",
    "INT16": "h",
    "UINT32": "I",
    "INT32": "i",
    "FLOAT32": "f",
    "BOOL": "?",
    "UINT64": "Q",
    "INT64": "q",
    "FLOAT64": "d",
}
"""struct formats (standard sizes) of GGUF's fixed-size value types, by `gguf.GGUFValueType` name."""


def _open(fh: BinaryIO, path: Path | str) -> tuple[_Header, int, int]:
    """The header reader of an open GGUF file, its tensor count and its key count (ValueError if not GGUF 2/3)."""
    from gguf import GGUF_MAGIC
    from gguf.gguf_reader import READER_SUPPORTED_VERSIONS

    head = fh.read(8)
    if len(head) != 8 or struct.unpack("<I", head[:4])[0] != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file")
    (version,) = struct.unpack("<I", head[4:])
    order = "<" if version & 0xFFFF else ">"  # a version that reads as 0 in its low half: the other byte order
    (version,) = struct.unpack(order + "I", head[4:])
    if version not in READER_SUPPORTED_VERSIONS:
        raise ValueError(f"{path} is GGUF version {version}, which cannot be read")
    header = _Header(fh, order)
    n_tensors, n_kv = header.unpack("QQ")
    return header, n_tensors, n_kv


def _entries(header: _Header, n_kv: int, keep: Callable[[str], bool]) -> Iterator[tuple[str, object]]:
    """The header's key-value pairs in order; the values of keys that `keep` refuses are skipped, and None."""
    for _ in range(n_kv):
        key = header.string()
        (kind,) = header.unpack("I")
        yield key, header.value(kind, keep(key))


def read_metadata(path: Path | str, keys: Iterable[str]) -> dict:
    """The values of those of `keys` that the GGUF file at `path` has (strings, numbers, bools, lists).

    Raises ValueError for a file that is not GGUF version 2 or 3 or whose header is cut short."""
    wanted, found = set(keys), {}
    with open(path, "rb") as fh:
        header, _, n_kv = _open(fh, path)
        if not wanted:
            return found
        for key, value in _entries(header, n_kv, wanted.__contains__):
            if key in wanted:
                found[key] = value
                if len(found) == len(wanted):  # stop early: the rest of the header is not read
                    break
    return found


def check_complete(path: Path | str) -> None:
    """Raise ValueError (saying what is wrong) unless the GGUF file at `path` can be a whole model: its header
    parses, names an architecture with its layer count and width, lists tensors, and the file holds every byte of
    them (a cut download fails here, not as a traceback, or a default-sized model, from the loader)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as fh:
        header, n_tensors, n_kv = _open(fh, path)

        def keep(key: str) -> bool:
            return key in ("general.architecture", "general.alignment") or key.endswith(
                (".block_count", ".embedding_length")
            )

        found = {key: value for key, value in _entries(header, n_kv, keep) if keep(key)}
        arch = found.get("general.architecture")
        if not isinstance(arch, str):
            raise ValueError("its header names no general.architecture")
        lacking = [k for k in (f"{arch}.block_count", f"{arch}.embedding_length") if k not in found]
        if lacking or not n_tensors:
            raise ValueError(f"its header lacks {', '.join(lacking) or 'tensors'}")
        end = 0
        for _ in range(n_tensors):
            header.string(keep=False)
            (n_dims,) = header.unpack("I")
            if n_dims > 4:  # GGML_MAX_DIMS
                raise ValueError(f"a tensor has {n_dims} dimensions")
            dims = header.unpack("Q" * n_dims)
            kind, offset = header.unpack("IQ")
            try:
                block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                raise ValueError(f"a tensor has the unknown type {kind}") from None
            end = max(end, offset + math.prod(dims) // block * size)
        alignment = found.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0:
            raise ValueError(f"its general.alignment is {alignment!r}")
        start = -(-fh.tell() // alignment) * alignment
    if header.size < start + end:
        raise ValueError(f"it is cut short: {header.size:,} bytes of the {start + end:,} its header describes")
