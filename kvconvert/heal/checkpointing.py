"""Periodic training state for `--resume`: accelerate's own save/load of model, optimizer, scheduler and RNG,
plus the token windows and the settings that must not change between an interrupted run and its resumption."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from kvconvert.errors import KVConvertError
from kvconvert.io.shards import spec_of, write_safetensors
from kvconvert.io.staging import staged, swap_into_place, temporary_of

LATEST = "latest"
META = "heal-state.json"
WINDOWS = "windows.safetensors"


def default_state_dir(output: Path) -> Path:
    """Where checkpoints go unless told: a visible sibling of the output directory."""
    return output.parent / f"{output.name}.heal-state"


def save_windows(state_dir: Path, windows: torch.Tensor, sources: list[dict]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    data = windows.to(torch.int64).contiguous()
    with staged(state_dir / WINDOWS, overwrite=True, directory=False, locked=False) as tmp:
        meta = {"sources": json.dumps(sources)}
        write_safetensors(tmp, {"windows": spec_of(data)}, {"windows": data}.__getitem__, meta)


def load_windows(state_dir: Path) -> tuple[torch.Tensor, list[dict]]:
    from safetensors import safe_open

    path = state_dir / WINDOWS
    if not path.exists():
        raise KVConvertError(f"no healing state in {state_dir}; run without --resume to start over")
    with safe_open(str(path), framework="pt") as f:
        sources = json.loads(f.metadata()["sources"])
    return load_file(str(path))["windows"], sources


def start_fresh(state_dir: Path, overwrite: bool) -> None:
    """Discard the state of an earlier run, but only when told to (--overwrite)."""
    if (state_dir / LATEST).exists():
        if not overwrite:
            raise KVConvertError(
                f"{state_dir} holds an interrupted healing run; pass --resume to continue it or --overwrite to restart"
            )
        shutil.rmtree(state_dir / LATEST)


def save_state(accelerator, state_dir: Path, step: int, settings: dict) -> None:
    """Write the state after `step` steps into a temporary directory, then swap it in as `latest` (all ranks call)."""
    tmp, latest = temporary_of(state_dir / LATEST), state_dir / LATEST
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / META).write_text(json.dumps({"step": step, "settings": settings}, indent=2, sort_keys=True) + "\n")
        swap_into_place(tmp, latest)
    accelerator.wait_for_everyone()


def load_state(accelerator, state_dir: Path, settings: dict) -> int:
    """Restore the latest state (after `prepare`); return the number of steps it had done."""
    latest = state_dir / LATEST
    if not (latest / META).exists():
        raise KVConvertError(f"no checkpoint in {state_dir}; run without --resume to start over")
    meta = json.loads((latest / META).read_text())
    changed = sorted(k for k in settings.keys() | meta["settings"].keys() if settings.get(k) != meta["settings"].get(k))
    if changed:
        raise KVConvertError(
            f"--resume with different settings ({', '.join(changed)}) than the interrupted run; "
            "use the same options or start over with --overwrite"
        )
    accelerator.load_state(str(latest))
    return int(meta["step"])
