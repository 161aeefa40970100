"""Calibration statistics: per-layer float64 sums of the attention input x and of x xᵀ, plus metadata.

The symmetric sums are kept as packed upper triangles, one tensor per layer; a loaded file is read lazily, one
layer at a time, so decomposition never holds more than one layer's statistics.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from kvconvert import __version__
from kvconvert.errors import KVConvertError, first_line
from kvconvert.io.shards import SafetensorsWriter
from kvconvert.io.staging import check_not_input, check_replaceable, output_lock, swap_into_place, temporary_of

SCHEMA_VERSION = 1


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

    A standard safetensors file written by the streaming writer of `kvconvert.io`: all shapes are known up front,
    so the header goes first and each layer's sums are appended when complete. The file is staged under a hidden
    name and renamed into place by `close` (the caller decides whether an existing file may be replaced).
    """

    def __init__(self, path: Path, n_layers: int, hidden: int, n_tokens: int, fingerprint: dict, source: dict):
        self.path, self.n_layers, self.hidden = Path(path), n_layers, hidden
        self.tmp = temporary_of(self.path)
        packed = hidden * (hidden + 1) // 2
        specs = {"n_tokens": (torch.int64, (1,))}
        for i in range(n_layers):
            specs[f"layers.{i}.sum_x"] = (torch.float64, (hidden,))
            specs[f"layers.{i}.sum_xx"] = (torch.float64, (packed,))
        metadata = {
            "format": "kvconvert-stats",
            "schema_version": str(SCHEMA_VERSION),
            "kvconvert_version": __version__,
            "fingerprint": json.dumps(fingerprint, sort_keys=True),
            "source": json.dumps(source, sort_keys=True),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = SafetensorsWriter(self.tmp, specs, metadata, in_given_order=True)  # layers in order
        self._writer.add("n_tokens", torch.tensor([n_tokens], dtype=torch.int64))
        self._next = 0

    def add(self, layer: int, sum_x: torch.Tensor, packed_xx: torch.Tensor) -> None:
        """Append layer `layer` (layers must come in order)."""
        if layer != self._next:
            raise ValueError(f"layer {layer} written out of order (expected {self._next})")
        self._writer.add(f"layers.{layer}.sum_x", sum_x.detach().to("cpu", torch.float64))
        self._writer.add(f"layers.{layer}.sum_xx", packed_xx.detach().to("cpu", torch.float64))
        self._next += 1

    def close(self) -> None:
        """Finish the file and move it into place (all layers must have been added)."""
        try:
            if self._next != self.n_layers:
                raise ValueError(f"stats file incomplete: {self._next} of {self.n_layers} layers")
            self._writer.close()
        except BaseException:
            self.abort()
            raise
        swap_into_place(self.tmp, self.path)

    def abort(self) -> None:
        self._writer.abort()
        self.tmp.unlink(missing_ok=True)


@contextmanager
def stats_output(path: Path, overwrite: bool, inputs: Iterable[Path] = (), writer: bool = True) -> Iterator[None]:
    """Hold `path` for one calibration run: refused at once if it overlaps an input (never replaced, even with
    `overwrite`), if it exists without `overwrite`, or if another run is writing it. Non-writer ranks only check."""
    check_not_input(path, inputs)
    check_replaceable(path, overwrite=overwrite, directory=False)
    if not writer:
        yield
        return
    with output_lock(path):
        yield


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
        if not packed.any():
            raise KVConvertError(f"{self._path} has all-zero sums in layer {layer}; the file is damaged: recalibrate")
        if not torch.isfinite(packed).all():
            raise KVConvertError(
                f"{self._path} has NaN/Inf in layer {layer} (fp16 overflow?); recalibrate with --dtype bfloat16 or "
                "float32"
            )
        return packed


def _check_layout(path: Path, f) -> tuple[int, int]:
    """(layers, hidden size) of an open stats file whose tensors are all present with consistent shapes."""
    keys = set(f.keys())
    n_layers = sum(1 for k in keys if k.endswith(".sum_x"))
    if "n_tokens" not in keys or n_layers == 0:
        raise KVConvertError(f"{path} lacks {'n_tokens' if n_layers else 'layers.0.sum_x'}; recalibrate")
    hidden = None
    for i in range(n_layers):
        for kind in ("sum_x", "sum_xx"):
            if f"layers.{i}.{kind}" not in keys:
                raise KVConvertError(f"{path} lacks layers.{i}.{kind} ({n_layers} layers recorded); recalibrate")
        shape_x = list(f.get_slice(f"layers.{i}.sum_x").get_shape())
        shape_xx = list(f.get_slice(f"layers.{i}.sum_xx").get_shape())
        hidden = shape_x[0] if hidden is None and len(shape_x) == 1 else hidden
        if shape_x != [hidden] or shape_xx != [hidden * (hidden + 1) // 2]:
            raise KVConvertError(
                f"{path} layer {i} has sums of shapes {shape_x} and {shape_xx}, inconsistent with hidden size "
                f"{hidden}; recalibrate"
            )
    if list(f.get_slice("n_tokens").get_shape()) != [1]:
        raise KVConvertError(f"{path} has a malformed n_tokens; recalibrate")
    return n_layers, hidden


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
                n_layers, hidden = _check_layout(path, f)
                sum_x = torch.stack([f.get_tensor(f"layers.{i}.sum_x") for i in range(n_layers)])
                n_tokens = int(f.get_tensor("n_tokens")[0])
                fingerprint, source = json.loads(meta["fingerprint"]), json.loads(meta["source"])
        except KVConvertError:
            raise
        except Exception as exc:
            raise KVConvertError(f"cannot read statistics file {path}: {first_line(exc)}; recalibrate") from None
        if not torch.isfinite(sum_x).all():
            raise KVConvertError(f"{path} contains NaN/Inf; recalibrate with --dtype bfloat16 or float32")
        if n_tokens <= 0:
            raise KVConvertError(f"{path} records {n_tokens} calibration tokens; recalibrate")
        zero = [i for i in range(n_layers) if not sum_x[i].any()]
        if zero:
            raise KVConvertError(f"{path} has all-zero sums in layer {zero[0]}; the file is damaged: recalibrate")
        if not isinstance(fingerprint, dict) or not isinstance(source, dict):
            raise KVConvertError(f"{path} has malformed metadata (fingerprint/source); recalibrate")
        for key, value in (("num_layers", n_layers), ("hidden_size", hidden)):
            if key in fingerprint and fingerprint[key] != value:
                raise KVConvertError(
                    f"{path} holds {value} for {key} but its fingerprint says {fingerprint[key]}; the file is "
                    "damaged: recalibrate"
                )
        return cls(sum_x, _FilePacked(path, n_layers), n_tokens, fingerprint, source)

    def check_model(self, fingerprint: dict, path: str | Path = "statistics") -> None:
        """Refuse statistics computed on another model."""
        if self.fingerprint != fingerprint:
            diff = [k for k in fingerprint if self.fingerprint.get(k) != fingerprint[k]]
            raise KVConvertError(
                f"{path} was computed on another model (differs in {', '.join(diff)}); "
                "recalibrate on this model or drop --stats"
            )
