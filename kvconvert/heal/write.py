"""Write the healed model as a stock checkpoint with exactly the student's tensor names, shapes and dtypes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict

from kvconvert.card import model_card
from kvconvert.checkpoint import Checkpoint
from kvconvert.errors import KVConvertError
from kvconvert.export import _swap_into_place
from kvconvert.filemodes import use_umask


def student_tensors(model, student: Checkpoint) -> dict[str, torch.Tensor]:
    """The model's tensors under the student's names, cast to the student's dtypes; shapes must match exactly."""
    state = model.state_dict()
    reader = student.tensors
    missing = [n for n in reader.names() if n not in state]
    if missing:
        raise KVConvertError(f"healed model lacks tensors {missing[:3]} of the student; please report this")
    out = {}
    for name in reader.names():
        t = state[name].detach()
        if list(t.shape) != reader.shape(name):
            want = reader.shape(name)
            raise KVConvertError(f"healed {name} has shape {list(t.shape)}, not {want}; please report this")
        out[name] = t.to("cpu", reader.dtype(name)).contiguous()
    return out


def write_healed(
    tensors: dict[str, torch.Tensor],
    student: Checkpoint,
    output: Path,
    record: dict,
    *,
    max_shard_size: int | str = "5GB",
) -> None:
    """Write `tensors` + the student's config, tokenizer and generation files + kvconvert.json (+ card) atomically.

    Everything goes into a temporary sibling renamed over `output` at the end, so `output` may be the student.
    """
    tmp = output.parent / f".{output.name}.kvconvert-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_torch_state_dict(tensors, tmp, max_shard_size=max_shard_size)
        for path in (student.path / "config.json", *student.side_files()):
            shutil.copyfile(path, tmp / path.name)
        (tmp / "kvconvert.json").write_text(json.dumps(record, indent=2) + "\n")
        if "num_key_value_heads" in record:
            (tmp / "README.md").write_text(model_card(record))
        elif (student.path / "README.md").exists():
            shutil.copyfile(student.path / "README.md", tmp / "README.md")
        use_umask(tmp)  # safetensors writes 0600
        _swap_into_place(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
