"""Calibration statistics: per-layer float64 sums of the attention input x and of x xᵀ, plus metadata.

The symmetric sums are kept as packed upper triangles, one tensor per layer; a loaded file is read lazily, one
layer at a time, so decomposition never holds more than one layer's statistics.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from kvconvert import __version__
from kvconvert.errors import KVConvertError

SCHEMA_VERSION = 1
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.int64: "I64"}


def pack(sym: torch.Tensor) -> torch.Tensor:
    """Upper triangle (row-major) of a symmetric matrix."""
    iu = torch.triu_indices(*sym.shape, device=sym.device)
    return sym[iu[0], iu[1]]


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack`."""
    iu = torch.triu_indices(n, n, device=packed.device)
    full = torch.zeros(n, n, dtype=packed.dtype, device=packed.device)
    full[iu[0], iu[1]] = packed
    return full + full.T - torch.diag(full.diagonal())


class StatsWriter:
    """Writes a stats file layer by layer, so finished layers never stay in memory.

    The file is a standard safetensors file (8-byte header length, JSON header, tensor bytes in offset order); all
    shapes are known up front, so the header is written first and each layer's sums are appended when complete.
    """

    def __init__(self, path: Path, n_layers: int, hidden: int, n_tokens: int, fingerprint: dict, source: dict):
        self.path, self.n_layers, self.hidden = Path(path), n_layers, hidden
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        packed = hidden * (hidden + 1) // 2
        specs = [("n_tokens", torch.int64, [1])]
        for i in range(n_layers):
            specs += [(f"layers.{i}.sum_x", torch.float64, [hidden]), (f"layers.{i}.sum_xx", torch.float64, [packed])]
        header, offset = {}, 0
        for name, dtype, shape in specs:
            size = shape[0] * torch.finfo(dtype).bits // 8 if dtype.is_floating_point else shape[0] * 8
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = {
            "format": "kvconvert-stats",
            "schema_version": str(SCHEMA_VERSION),
            "kvconvert_version": __version__,
            "fingerprint": json.dumps(fingerprint, sort_keys=True),
            "source": json.dumps(source, sort_keys=True),
        }
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.tmp, "wb")  # noqa: SIM115  (closed in close())
        self._file.write(len(blob).to_bytes(8, "little") + blob)
        self._file.write(torch.tensor([n_tokens], dtype=torch.int64).numpy().tobytes())
        self._next = 0

    def add(self, layer: int, sum_x: torch.Tensor, packed_xx: torch.Tensor) -> None:
        """Append layer `layer` (layers must come in order)."""
        if layer != self._next:
            raise ValueError(f"layer {layer} written out of order (expected {self._next})")
        for t in (sum_x, packed_xx):
            self._file.write(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
        self._next += 1

    def close(self) -> None:
        """Finish the file and move it into place (all layers must have been added)."""
        self._file.close()
        if self._next != self.n_layers:
            self.tmp.unlink(missing_ok=True)
            raise ValueError(f"stats file incomplete: {self._next} of {self.n_layers} layers")
        self.tmp.replace(self.path)

    def abort(self) -> None:
        self._file.close()
        self.tmp.unlink(missing_ok=True)


class _FilePacked(Sequence):
    """Per-layer packed sums read from a stats file on access."""

    def __init__(self, path: Path, n_layers: int):
        self._path, self._n = path, n_layers

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, layer: int) -> torch.Tensor:
        try:
            with safe_open(str(self._path), framework="pt") as f:
                packed = f.get_tensor(f"layers.{layer}.sum_xx")
        except Exception as exc:
            raise KVConvertError(f"cannot read layer {layer} of {self._path}: {exc}; recalibrate") from exc
        if not torch.isfinite(packed).all():
            raise KVConvertError(
                f"{self._path} has NaN/Inf in layer {layer} (fp16 overflow?); recalibrate with --dtype bfloat16 or "
                "float32"
            )
        return packed


@dataclass
class CalibrationStats:
    """Sufficient statistics of the attention inputs: sum_x (L, h), packed sum_xx per layer, tokens, metadata."""

    sum_x: torch.Tensor
    packed_xx: Sequence[torch.Tensor]
    n_tokens: int
    fingerprint: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return self.sum_x.shape[0]

    def sum_xx(self, layer: int) -> torch.Tensor:
        """Σ x xᵀ of layer `layer` as a full (h, h) float64 matrix."""
        return unpack(self.packed_xx[layer], self.sum_x.shape[1])

    def moments(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(E[x xᵀ], E[x]) of layer `layer` in float64."""
        return self.sum_xx(layer) / self.n_tokens, self.sum_x[layer] / self.n_tokens

    def __add__(self, other: CalibrationStats) -> CalibrationStats:
        if self.fingerprint != other.fingerprint:
            raise KVConvertError("cannot add statistics of different models")
        packed = [a + b for a, b in zip(self.packed_xx, other.packed_xx, strict=True)]
        return CalibrationStats(
            self.sum_x + other.sum_x, packed, self.n_tokens + other.n_tokens, self.fingerprint, self.source
        )

    def check_finite(self) -> None:
        finite = torch.isfinite(self.sum_x).all() and all(torch.isfinite(p).all() for p in self.packed_xx)
        if not finite:
            raise KVConvertError(
                "calibration statistics contain NaN/Inf (fp16 overflow?); recalibrate with --dtype bfloat16 or float32"
            )

    def save(self, path: str | Path) -> None:
        """One safetensors file, written to a temporary name and renamed into place."""
        writer = StatsWriter(path, self.num_layers, self.sum_x.shape[1], self.n_tokens, self.fingerprint, self.source)
        try:
            for i in range(self.num_layers):
                writer.add(i, self.sum_x[i], self.packed_xx[i])
        except BaseException:
            writer.abort()
            raise
        writer.close()

    @classmethod
    def load(cls, path: str | Path) -> CalibrationStats:
        """Metadata and Σx now; each layer's Σxxᵀ when it is asked for."""
        path = Path(path)
        if not path.is_file():
            raise KVConvertError(f"statistics file {path} does not exist; create it with `kvconvert calibrate`")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != "kvconvert-stats":
                    raise KVConvertError(f"{path} is not a kvconvert statistics file")
                if int(meta.get("schema_version", -1)) != SCHEMA_VERSION:
                    raise KVConvertError(
                        f"{path} has stats schema {meta.get('schema_version')}, this kvconvert reads "
                        f"{SCHEMA_VERSION}; recalibrate"
                    )
                n_layers = sum(1 for k in f.keys() if k.endswith(".sum_x"))  # noqa: SIM118
                sum_x = torch.stack([f.get_tensor(f"layers.{i}.sum_x") for i in range(n_layers)])
                n_tokens = int(f.get_tensor("n_tokens")[0])
                fingerprint, source = json.loads(meta["fingerprint"]), json.loads(meta["source"])
        except KVConvertError:
            raise
        except Exception as exc:
            raise KVConvertError(f"cannot read statistics file {path}: {exc}; recalibrate") from exc
        if not torch.isfinite(sum_x).all():
            raise KVConvertError(f"{path} contains NaN/Inf; recalibrate with --dtype bfloat16 or float32")
        return cls(sum_x, _FilePacked(path, n_layers), n_tokens, fingerprint, source)

    def check_model(self, fingerprint: dict, path: str | Path = "statistics") -> None:
        """Refuse statistics computed on another model."""
        if self.fingerprint != fingerprint:
            diff = [k for k in fingerprint if self.fingerprint.get(k) != fingerprint[k]]
            raise KVConvertError(
                f"{path} was computed on another model (differs in {', '.join(diff)}); "
                "recalibrate on this model or drop --stats"
            )
