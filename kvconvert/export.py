"""Export stage: fold the plan into the attention tensors and write a stock checkpoint, tensor by tensor.

Shard headers are computed from shapes and dtypes first; each tensor is then written as soon as it is ready (a
folded attention layer, or a source tensor passed through as read), so memory holds about one layer whatever the
shard size. Everything goes into a hidden staging directory that is checked (`check`) and only then renamed into
place: the output is either the old one, untouched, or the complete new one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from kvconvert.checkpoint import Checkpoint
from kvconvert.converted import Converted
from kvconvert.errors import KVConvertError
from kvconvert.families.base import converted_shapes, converted_tensors
from kvconvert.io.shards import ShardPlan, Spec, layout, write_shards
from kvconvert.io.staging import check_not_input, check_replaceable, staged
from kvconvert.memory import release_memory
from kvconvert.progress import Progress, Silent
from kvconvert.razor.store import CONFIG_KEY as RAZOR_CONFIG_KEY

__all__ = ["ExportResult", "layers_in_write_order", "prepare_output", "write_checkpoint", "write_into"]


@dataclass(frozen=True)
class ExportResult:
    output: Path
    shards: tuple[str, ...]
    bytes_written: int


def prepare_output(output: Path, source: Path, overwrite: bool) -> None:
    """Refuse outputs that would clobber data or the input checkpoint (checked again, under a lock, when writing)."""
    check_not_input(output, [source])
    check_replaceable(output, overwrite=overwrite, directory=True)


def attention_index(ckpt: Checkpoint) -> dict[str, int]:
    """Checkpoint name -> layer of every attention tensor (the family says which names a layer has)."""
    fam, n_layers = ckpt.family, ckpt.family.geometry(ckpt.config).num_layers
    return {name: layer for layer in range(n_layers) for name in fam.attention_names(layer, ckpt.tensors.__contains__)}


def _new_shapes(ckpt: Checkpoint, attn: dict[str, int], n_new: int) -> dict[str, list[int]]:
    """Shapes of the converted attention tensors, laid out by the family."""
    fam, geom = ckpt.family, ckpt.family.geometry(ckpt.config)
    by_layer: dict[int, dict[str, list[int]]] = {}
    for name, layer in attn.items():
        by_layer.setdefault(layer, {})[name] = ckpt.tensors.shape(name)
    return {
        n: s for layer, shapes in by_layer.items() for n, s in converted_shapes(fam, layer, shapes, geom, n_new).items()
    }


def specs_for(ckpt: Checkpoint, n_new: int) -> dict[str, Spec]:
    """Dtype and shape of every output tensor of `ckpt` converted to `n_new` KV heads (the source's; attention as
    the family lays out the new head count)."""
    reader = ckpt.tensors
    shapes = _new_shapes(ckpt, attention_index(ckpt), n_new)
    return {name: (reader.dtype(name), tuple(shapes.get(name) or reader.shape(name))) for name in reader.names()}


def output_specs(conv: Converted) -> dict[str, Spec]:
    """`specs_for` the conversion's checkpoint and head count."""
    return specs_for(conv.ckpt, conv.plan.num_kv_heads_after)


def layers_in_write_order(ckpt: Checkpoint, n_new: int, max_shard_size: int | str = "5GB") -> list[int]:
    """Layers in the order the writer first needs their attention (shard by shard, each in safetensors' layout:
    by dtype, then by name, so layer 10 comes before layer 2). Planning them in this order keeps an overlapped
    export from waiting on layers it does not need yet."""
    specs = specs_for(ckpt, n_new)
    attn, seen = attention_index(ckpt), {}
    for names in ShardPlan.split(specs, max_shard_size).files.values():
        for name in layout({n: specs[n] for n in names}):
            if name in attn:
                seen.setdefault(attn[name], None)
    return list(seen)


class TensorSource:
    """Output tensors by name: folded attention (one layer cached until all its tensors are taken) or as read."""

    def __init__(self, conv: Converted):
        self.conv, self.attn = conv, attention_index(conv.ckpt)
        self.geom = conv.ckpt.family.geometry(conv.ckpt.config).with_kv_heads(conv.plan.num_kv_heads_after)
        self.remaining: dict[int, int] = {}
        for layer in self.attn.values():
            self.remaining[layer] = self.remaining.get(layer, 0) + 1
        self.folded: dict[int, dict[str, torch.Tensor]] = {}

    def layer(self, layer: int) -> dict[str, torch.Tensor]:
        """Checkpoint name -> tensor of one converted layer's attention, as the family writes it."""
        return converted_tensors(self.conv.ckpt.family, layer, self.conv.attention(layer), self.geom)

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.attn:
            return self.conv.ckpt.tensors.get(name)
        layer = self.attn[name]
        if layer not in self.folded:
            self.folded[layer] = self.layer(layer)
        t = self.folded[layer][name].contiguous()
        _check_finite(t, name)
        self.remaining[layer] -= 1
        if self.remaining[layer] == 0:
            del self.folded[layer]
            release_memory()
        return t


ExtraFiles = Mapping[str, str] | Callable[[], Mapping[str, str]]
"""File name -> text, or a function giving them once the weights are written (when the plan was still pending)."""


def write_into(
    conv: Converted,
    directory: Path,
    *,
    extra_files: ExtraFiles,
    max_shard_size: int | str = "5GB",
    progress: Progress | None = None,
) -> ExportResult:
    """Write weights, patched config, tokenizer/generation files and `extra_files` into the existing `directory`."""
    ckpt = conv.ckpt
    specs = output_specs(conv)
    plan = ShardPlan.split(specs, max_shard_size)
    advance = (progress or Silent()).task("writing tensors", len(specs))
    source = TensorSource(conv)

    def produce(name: str) -> torch.Tensor:
        t = source(name)
        advance()
        return t

    written = write_shards(directory, specs, produce, plan)
    config = dict(ckpt.raw_config)
    config[ckpt.family.kv_heads_key] = conv.plan.num_kv_heads_after
    config.pop(RAZOR_CONFIG_KEY, None)  # the source's retrieval heads name KV heads the merge has replaced
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for path in ckpt.side_files():
        shutil.copyfile(path, directory / path.name)
    for name, text in (extra_files() if callable(extra_files) else extra_files).items():
        (directory / name).write_text(text)
    return ExportResult(directory, tuple(plan.files), written)


def write_checkpoint(
    conv: Converted,
    output: Path,
    *,
    extra_files: ExtraFiles,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: Progress | None = None,
    check: Callable[[Path], None] | None = None,
) -> ExportResult:
    """Write the converted checkpoint to `output`; `check(staging_dir)` runs before it replaces anything."""
    with staged(output, overwrite=overwrite, inputs=[conv.ckpt.path]) as tmp:
        result = write_into(conv, tmp, extra_files=extra_files, max_shard_size=max_shard_size, progress=progress)
        if check is not None:
            check(tmp)
    return ExportResult(output, result.shards, result.bytes_written)


def _check_finite(t: torch.Tensor, name: str) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise KVConvertError(
            f"merged tensor {name} has NaN/Inf ({t.dtype} overflow?); convert a bfloat16 or float32 checkpoint"
        )
