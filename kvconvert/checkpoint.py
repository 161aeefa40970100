"""Resolve MODEL (local dir, Hub id, .gguf file, built-in alias) to a local checkpoint with lazily read tensors."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from kvconvert.errors import KVConvertError, first_line
from kvconvert.families import Family, family_for
from kvconvert.io.shards import raw_bytes
from kvconvert.progress import Progress
from kvconvert.sources import BUILTINS, builtin_gguf, cache_root, gguf_checkpoint, gguf_license, hub_snapshot
from kvconvert.tensors import TensorReader, weight_files
from kvconvert.types import AttentionWeights

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
TOKENIZER_CORE = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer.tiktoken")
"""Files that actually define a tokenizer (a tokenizer_config.json alone does not)."""


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
            raise KVConvertError(f"cannot read {self.path / 'config.json'}: {first_line(exc)}") from exc

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
        """One layer's attention projections (biases and QK-norm where the checkpoint has them), read by the family."""
        fam, t = self.family, self.tensors
        prefix = fam.prefix(layer)
        tensors = {}
        for name in fam.attention_names(layer, t.__contains__):
            value = t.get(name)
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise KVConvertError(
                    f"{name} of {self.spec} contains NaN/Inf; the checkpoint is corrupt or overflowed: re-download it "
                    "or convert a bfloat16/float32 copy"
                )
            tensors[name[len(prefix) :]] = value
        return fam.read(tensors, fam.geometry(self.config))

    def fingerprint(self) -> dict:
        """Family, shapes and a sampled hash of every tensor: enough to tell statistics of another model apart.

        Every tensor's name, dtype and shape, plus four of its rows (first, last and two between; a 0-/1-dim tensor
        whole), so a model that differs anywhere (a fine-tune of only its MLP or norms) gets another hash, while a
        70B checkpoint costs a few MB of reads.
        """
        fam, geom, t = self.family, self.family.geometry(self.config), self.tensors
        h = hashlib.sha256()
        for name in sorted(t.names()):
            shape, dtype = t.shape(name), t.dtype(name)
            h.update(f"{name}|{dtype}|{shape}".encode())
            if len(shape) <= 1:
                h.update(raw_bytes(t.get(name)))
                continue
            for start in sorted({0, shape[0] // 3, 2 * shape[0] // 3, shape[0] - 1}):
                if 0 <= start < shape[0]:
                    h.update(raw_bytes(t.rows(name, start, start + 1)))
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
    spec: str,
    *,
    revision: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
) -> Checkpoint:
    """Local checkpoint for MODEL: a directory, a .gguf file, a built-in alias, or a Hub id.

    Pickle (`.bin`) weights are refused unless `allow_pickle`; then they are read with `weights_only=True` into a
    cached safetensors copy. `trust_remote_code` is passed to transformers and is off unless asked for. `progress`
    hears of a first-time GGUF expansion.
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
        return Checkpoint(gguf_checkpoint(path.resolve(), progress), spec, declared_license=gguf_license(path))
    if spec in BUILTINS:
        b = BUILTINS[spec]
        gguf = builtin_gguf(b)
        return Checkpoint(
            gguf_checkpoint(gguf, progress), spec, base_model=b.base_model, declared_license=gguf_license(gguf)
        )
    if path.exists() or spec.startswith((".", "/", "~")):
        raise KVConvertError(f"{spec} is neither a checkpoint directory nor a .gguf file")
    local = _safetensors_dir(hub_snapshot(spec, revision, allow_pickle), spec, allow_pickle, trust_remote_code)
    return Checkpoint(local, spec, base_model=spec, trust_remote_code=trust_remote_code)


def _safetensors_dir(path: Path, spec: str, allow_pickle: bool, trust_remote_code: bool) -> Path:
    """`path` itself, or (pickle checkpoints, when allowed) its cached safetensors copy."""
    from kvconvert.pickled import pickle_weights, safetensors_copy

    if weight_files(path) or not pickle_weights(path):
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
