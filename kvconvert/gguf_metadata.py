"""A few metadata values of a GGUF file, read from its key-value header without loading the rest.

`gguf.GGUFReader` maps every field of the file into numpy views before anything can be read; for SmolLM2's
49k-token vocabulary that is 1.9 s per open on this project's 2-core CPU machine, paid on every run that names a
GGUF model. This walks the header once, skips what it is not asked for (fixed-size arrays by their lengths), and
stops once the asked-for keys are found. The value types are the `gguf` package's own; their struct formats are
listed here.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO


class _Header:
    """Sequential reads of a GGUF header in the file's byte order."""

    def __init__(self, fh: BinaryIO, order: str) -> None:
        self.fh, self.order = fh, order

    def unpack(self, fmt: str) -> tuple:
        size = struct.calcsize(self.order + fmt)
        data = self.fh.read(size)
        if len(data) != size:
            raise ValueError("GGUF header ends early")
        return struct.unpack(self.order + fmt, data)

    def string(self, keep: bool = True) -> str | None:
        (n,) = self.unpack("Q")
        if not keep:
            self.fh.seek(n, 1)
            return None
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
                self.fh.seek(count * struct.calcsize("<" + fixed), 1)
                return None
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


def read_metadata(path: Path | str, keys: Iterable[str]) -> dict:
    """The values of those of `keys` that the GGUF file at `path` has (strings, numbers, bools, lists).

    Raises ValueError for a file that is not GGUF version 2 or 3 or whose header is cut short."""
    from gguf import GGUF_MAGIC
    from gguf.gguf_reader import READER_SUPPORTED_VERSIONS

    wanted, found = set(keys), {}
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8 or struct.unpack("<I", head[:4])[0] != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file")
        (version,) = struct.unpack("<I", head[4:])
        order = "<" if version & 0xFFFF else ">"  # a version that reads as 0 in its low half: the other byte order
        (version,) = struct.unpack(order + "I", head[4:])
        if version not in READER_SUPPORTED_VERSIONS:
            raise ValueError(f"{path} is GGUF version {version}, which cannot be read")
        header = _Header(fh, order)
        _, n_kv = header.unpack("QQ")
        for _ in range(n_kv):
            if len(found) == len(wanted):
                break
            key = header.string()
            (kind,) = header.unpack("I")
            value = header.value(kind, keep=key in wanted)
            if key in wanted:
                found[key] = value
    return found
