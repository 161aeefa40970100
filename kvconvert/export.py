"""Export stage: fold the plan into the attention tensors and write a stock checkpoint, shard by shard.

Every non-attention tensor is passed through as read; output shards are filled one at a time, so memory stays
about one shard plus one layer. Everything is written into a temporary sibling directory that is renamed into
place at the end: the output is either complete or absent.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

from kvconvert.atomic import swap_into_place
from kvconvert.checkpoint import Checkpoint
from kvconvert.converted import Converted
from kvconvert.errors import KVConvertError
from kvconvert.filemodes import use_umask
from kvconvert.memory import release_memory
from kvconvert.merge.moments import AttentionWeights
from kvconvert.progress import Progress, Silent

FIELDS = {("q", "weight"): "q_weight", ("k", "weight"): "k_weight", ("v", "weight"): "v_weight"}
FIELDS |= {("o", "weight"): "o_weight", ("q", "bias"): "q_bias", ("k", "bias"): "k_bias", ("v", "bias"): "v_bias"}


@dataclass(frozen=True)
class ExportResult:
    output: Path
    shards: tuple[str, ...]
    bytes_written: int


def prepare_output(output: Path, source: Path, overwrite: bool) -> None:
    """Refuse outputs that would clobber data or the input checkpoint."""
    out, src = output.resolve(), source.resolve()
    if out == src or src in out.parents or out in src.parents:
        raise KVConvertError(f"output {output} overlaps the input checkpoint {source}; choose a separate directory")
    if output.exists() and not output.is_dir():
        raise KVConvertError(f"output {output} exists and is not a directory; choose another path")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise KVConvertError(f"output directory {output} is not empty; pass --overwrite or choose another path")


def _attention_index(ckpt: Checkpoint) -> dict[str, tuple[int, str]]:
    fam, n_layers = ckpt.family, ckpt.family.geometry(ckpt.config).num_layers
    index = {}
    for layer in range(n_layers):
        for (proj, kind), field in FIELDS.items():
            name = fam.tensor_name(layer, proj, kind)
            if name in ckpt.tensors:
                index[name] = (layer, field)
    return index


def _new_shape(ckpt: Checkpoint, name: str, field: str | None, n_new: int) -> list[int]:
    shape = ckpt.tensors.shape(name)
    if field in ("k_weight", "v_weight", "k_bias", "v_bias"):
        shape[0] = n_new * ckpt.family.geometry(ckpt.config).head_dim
    return shape


def write_checkpoint(
    conv: Converted,
    output: Path,
    *,
    extra_files: dict[str, str],
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ExportResult:
    """Write weights, patched config, tokenizer/generation files and `extra_files` (name -> text) to `output`."""
    ckpt = conv.ckpt
    prepare_output(output, ckpt.path, overwrite)
    reader, attn = ckpt.tensors, _attention_index(ckpt)
    n_new = conv.plan.num_kv_heads_after
    metas = {
        name: torch.empty(
            _new_shape(ckpt, name, attn.get(name, (0, None))[1], n_new), dtype=reader.dtype(name), device="meta"
        )
        for name in reader.names()
    }
    split = split_torch_state_dict_into_shards(
        metas, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    tmp = output.parent / f".{output.name}.kvconvert-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        remaining = {}
        for layer, _ in attn.values():
            remaining[layer] = remaining.get(layer, 0) + 1
        folded: dict[int, AttentionWeights] = {}
        advance = (progress or Silent()).task("writing shards", len(split.filename_to_tensors))
        written = 0
        for filename, names in split.filename_to_tensors.items():
            shard = {}
            for name in names:
                if name in attn:
                    layer, field = attn[name]
                    if layer not in folded:
                        folded[layer] = conv.attention(layer)
                    shard[name] = getattr(folded[layer], field).contiguous()
                    _check_finite(shard[name], name)
                    remaining[layer] -= 1
                    if remaining[layer] == 0:
                        del folded[layer]
                else:
                    shard[name] = reader.get(name)
            save_file(shard, str(tmp / filename), metadata={"format": "pt"})
            written += sum(t.numel() * t.element_size() for t in shard.values())
            del shard
            release_memory()
            advance()
        if split.is_sharded:
            index = {"metadata": {"total_size": written}, "weight_map": split.tensor_to_filename}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        config = dict(ckpt.raw_config)
        config[ckpt.family.kv_heads_key] = n_new
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for path in ckpt.side_files():
            shutil.copyfile(path, tmp / path.name)
        for name, text in extra_files.items():
            (tmp / name).write_text(text)
        use_umask(tmp)  # safetensors writes 0600
        _swap_into_place(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(output, tuple(split.filename_to_tensors), written)


def _check_finite(t: torch.Tensor, name: str) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise KVConvertError(
            f"merged tensor {name} has NaN/Inf ({t.dtype} overflow?); convert a bfloat16 or float32 checkpoint"
        )


def _swap_into_place(tmp: Path, output: Path) -> None:
    """Rename the finished temporary directory to `output`, replacing an old output only at the very end."""
    swap_into_place(tmp, output)
