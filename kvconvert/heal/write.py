"""Write the healed model as a stock checkpoint with exactly the student's tensor names, shapes and dtypes."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from kvconvert.card import model_card
from kvconvert.checkpoint import Checkpoint
from kvconvert.errors import KVConvertError
from kvconvert.io.shards import ShardPlan, spec_of, write_shards
from kvconvert.io.staging import staged
from kvconvert.record import RECORD, Record, dump_record


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
    record: Record,
    *,
    max_shard_size: int | str = "5GB",
    check: Callable[[Path], None] | None = None,
) -> None:
    """Write `tensors` + the student's config, tokenizer and generation files + kvconvert.json (+ card) atomically.

    Everything goes into a staging sibling, checked by `check(staging_dir)`, then renamed over `output` (which may
    be the student: the caller has decided it may be replaced).
    """
    specs = {name: spec_of(t) for name, t in tensors.items()}
    with staged(output, overwrite=True) as tmp:
        write_shards(tmp, specs, tensors.__getitem__, ShardPlan.split(specs, max_shard_size))
        for path in (student.path / "config.json", *student.side_files()):
            shutil.copyfile(path, tmp / path.name)
        (tmp / RECORD).write_text(dump_record(record))
        if record.is_conversion:
            (tmp / "README.md").write_text(model_card(record))
        elif (student.path / "README.md").exists():
            shutil.copyfile(student.path / "README.md", tmp / "README.md")
        if check is not None:
            check(tmp)
