"""Load stock transformers models and tokenizers on a chosen device and dtype."""

from __future__ import annotations

import torch

from kvconvert.checkpoint import Checkpoint
from kvconvert.errors import KVConvertError, first_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KVConvertError(f"--device {device} asked for, but no CUDA device is visible; use --device cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:  # torch's own message lists twenty device types kvconvert does not use
        raise KVConvertError(f"--device {device} is not a device; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise KVConvertError(
            f"--device {device} asked for, but only {torch.cuda.device_count()} CUDA device(s) are visible; use "
            "cuda:0 .. cuda:N-1"
        )
    if resolved.type not in ("cpu", "cuda"):
        raise KVConvertError(f"--device {device}: kvconvert runs on the CPU or CUDA; use auto, cpu, cuda or cuda:N")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is float32 on CPU and bfloat16 on accelerators."""
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise KVConvertError(f"unknown dtype {dtype}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(ckpt: Checkpoint | str, device: torch.device, dtype: torch.dtype):
    """Stock `AutoModelForCausalLM` in eval mode."""
    from transformers import AutoModelForCausalLM

    path, remote = (ckpt.path, ckpt.trust_remote_code) if isinstance(ckpt, Checkpoint) else (ckpt, False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=str(device), trust_remote_code=remote)
    return model.eval()


def load_tokenizer(ckpt: Checkpoint | str):
    from transformers import AutoTokenizer

    path, remote = (ckpt.path, ckpt.trust_remote_code) if isinstance(ckpt, Checkpoint) else (ckpt, False)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=remote)
    except (OSError, ValueError) as exc:
        raise KVConvertError(
            f"no usable tokenizer in {path} ({first_line(exc)}); copy the base model's tokenizer files there"
        ) from exc
