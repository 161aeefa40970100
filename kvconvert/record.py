"""The conversion record (`kvconvert.json`) as typed models with a schema version.

Every stage that writes or reads a record goes through `Record`: `compress` creates it, `heal`, `eval`, `push`,
`profile` and `matryoshka` add their section. Sections keep unknown keys (`extra="allow"`), so a record written
by a newer kvconvert with extra fields still reads; a higher `schema_version` is refused with one line. Records
written before the version existed have the layout of version 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvconvert.errors import KVConvertError
from kvconvert.io.staging import read_json

RECORD = "kvconvert.json"
SCHEMA_VERSION = 1


class Section(BaseModel):
    """A part of the record; keys this version does not know are kept as they are."""

    model_config = ConfigDict(extra="allow")


class BeforeAfter(Section):
    before: int
    after: int


class KVCache(Section):
    dtype: str | None = None
    dtype_bytes: int
    bytes_per_token: BeforeAfter
    context_length: int | None = None
    bytes_at_context: BeforeAfter | None = None
    """The cache after `context_length` tokens, sliding-window layers keeping only their window."""


class Calibration(Section):
    dataset: str | None = None
    samples: int | None = None
    seq_len: int | None = None
    seed: int | None = None
    dtype: str | None = None
    data: str | None = None
    tokens_sha256: str | None = None
    tokens: int | None = None


class LayerPlan(Section):
    layer: int
    groups: list[list[int]]
    query_heads: list[list[int]]
    key_energy_retained: float
    value_energy_retained: float


class Refine(Section):
    steps: int
    lr: float
    batch_size: int | None = None
    inputs: str | None = None
    samples: int | None = None
    layers: Any = None


class Heal(Section):
    kvconvert_version: str | None = None
    teacher: str
    data: list[dict] = Field(default_factory=list)
    tokens: int
    steps: int
    global_batch_size: int | None = None
    seq_len: int | None = None
    train: str
    lora_rank: int | None = None
    lr: float | None = None
    warmup: float | None = None
    kl_weight: float | None = None
    ce_weight: float | None = None
    temperature: float | None = None
    processes: int = 1
    seed: int | None = None
    windows_sha256: str | None = None
    final_loss: float | None = None
    resumed_from_step: int | None = None


class Perplexity(Section):
    before: float | None = None
    after: float


class Evaluation(Section):
    dataset: str
    samples: int
    seq_len: int
    seed: int | None = None
    dtype: str
    data: str | None = None
    tokens_sha256: str | None = None
    baseline: str | None = None
    perplexity: Perplexity


class Hub(Section):
    repo_id: str


class Record(Section):
    """kvconvert.json. Field order is the file's key order; only the keys that were set are written."""

    schema_version: int = SCHEMA_VERSION
    kvconvert_version: str
    name: str | None = None
    source: str | None = None
    base_model: str | None = None
    license: str | None = None
    dtype: str | None = None
    gguf_source: dict | None = None
    kv_cache: KVCache | None = None
    fingerprint: dict | None = None
    calibration: Calibration | None = None
    method: str | None = None
    grouping: str | None = None
    num_key_value_heads: BeforeAfter | None = None
    layers: list[LayerPlan] = Field(default_factory=list)
    refine: Refine | None = None
    heal: Heal | None = None
    recipe: dict | None = None
    evaluation: Evaluation | None = None
    hub: Hub | None = None
    razor_profile: dict | None = None
    matryoshka: dict | None = None

    @property
    def is_conversion(self) -> bool:
        """A head merge's record (it has a model card); other records only carry sections."""
        return self.num_key_value_heads is not None and self.source is not None

    def data(self) -> dict:
        """JSON-ready, with `schema_version` first and only the keys that were set."""
        return {"schema_version": self.schema_version} | self.model_dump(mode="json", exclude_unset=True)

    def with_sections(self, **sections: Any) -> Record:
        """A copy with `sections` (name -> model or dict) set, validated like a record read from disk."""
        plain = {
            k: v.model_dump(mode="json", exclude_unset=True) if isinstance(v, BaseModel) else v
            for k, v in sections.items()
        }
        return parse_record(self.data() | plain, RECORD)

    def without(self, *names: str) -> Record:
        """A copy without the sections `names`."""
        return parse_record({k: v for k, v in self.data().items() if k not in names}, RECORD)


def parse_record(data: Any, where: str) -> Record:
    """Validate record data; one-line `KVConvertError` naming the first problem."""
    if not isinstance(data, dict):
        raise KVConvertError(f"{where} is not a kvconvert record (a JSON object is expected)")
    version = data.get("schema_version", SCHEMA_VERSION)
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise KVConvertError(
            f"{where} has record schema {version}, newer than this kvconvert's {SCHEMA_VERSION}; upgrade kvconvert"
        )
    try:
        return Record.model_validate({"schema_version": SCHEMA_VERSION} | data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise KVConvertError(f"{where}: {loc}: {err['msg']}; re-run the stage that wrote it") from None


def new_record(**fields: Any) -> Record:
    """A record of this kvconvert version with `fields` set."""
    from kvconvert import __version__

    return parse_record({"kvconvert_version": __version__} | fields, RECORD)


def dump_record(record: Record) -> str:
    return json.dumps(record.data(), indent=2) + "\n"


def load_record(directory: Path) -> Record:
    path = directory / RECORD
    if not path.is_file():
        raise KVConvertError(f"{directory} has no {RECORD}; point at a directory written by `kvconvert compress`")
    return parse_record(read_json(path, "re-run `kvconvert compress`"), str(path))


def read_record(directory: Path) -> Record | None:
    """The record in `directory`, or None where there is none."""
    return load_record(directory) if (directory / RECORD).is_file() else None
