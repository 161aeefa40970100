"""Recipes: one YAML file drives model -> calibrate -> compress -> heal -> eval -> push (`kvconvert run RECIPE.yaml`).

Every section is a pydantic model that forbids unknown keys, so a typo is an error naming the key (and the closest
valid one). Relative paths are relative to the working directory.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kvconvert.decompose import GROUPINGS
from kvconvert.errors import KVConvertError
from kvconvert.heal.trainable import TRAIN_MODES
from kvconvert.merge.methods import METHODS
from kvconvert.modeling import DTYPES
from kvconvert.refine import INPUTS


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _one_of(value: str, choices, what: str) -> str:
    if value not in choices:
        raise ValueError(f"{what} {value!r} is not one of {', '.join(choices)}")
    return value


class Calibrate(Section):
    """Calibration text and how much of it (see `kvconvert calibrate`)."""

    dataset: str = "self"
    samples: int = Field(128, ge=1)
    seq_len: int = Field(2048, ge=2)
    batch_size: int = Field(1, ge=1)
    seed: int = 0
    text_field: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    offload_dir: Path | None = None
    stats: Path | None = None
    """Keep the statistics here; a later run (another head count) reuses them if they match this section."""

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        return _one_of(v, ("auto", *DTYPES), "dtype")


class Refine(Section):
    steps: int = Field(0, ge=0)
    lr: float = Field(0.02, gt=0)
    samples: int = Field(16, ge=1)
    inputs: str = "sequential"

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, v: str) -> str:
        return _one_of(v, INPUTS, "refine inputs")


class Compress(Section):
    heads: str
    """A count of KV heads (8) or a fraction of the current ones (0.25)."""
    method: str = "weighted"
    grouping: str = "search"
    refine: Refine = Field(default_factory=Refine)
    verify: bool = True
    max_shard_size: str = "5GB"
    allow_missing_tokenizer: bool = False

    @field_validator("heads", mode="before")
    @classmethod
    def _heads(cls, v: Any) -> str:
        if isinstance(v, bool) or not isinstance(v, int | float | str):
            raise ValueError("heads must be a count (8) or a fraction of the current KV heads (0.25)")
        return str(v)

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        return _one_of(v, METHODS, "method")

    @field_validator("grouping")
    @classmethod
    def _grouping(cls, v: str) -> str:
        return _one_of(v, GROUPINGS, "grouping")


class Heal(Section):
    """Distil the merged output from the original in place (see `kvconvert heal`)."""

    datasets: list[str] = Field(default_factory=lambda: ["self"], min_length=1)
    tokens: int | None = Field(100_000, ge=1)
    steps: int | None = Field(None, ge=1)
    seq_len: int = Field(512, ge=2)
    batch_size: int = Field(2, ge=1)
    lr: float = Field(3e-4, gt=0)
    train: str = "attn"
    lora_rank: int = Field(16, ge=1)
    kl_weight: float = Field(1.0, ge=0)
    ce_weight: float = Field(0.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    checkpoint_every: int = Field(50, ge=1)

    @field_validator("train")
    @classmethod
    def _train(cls, v: str) -> str:
        return _one_of(v, TRAIN_MODES, "train")

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        return _one_of(v, ("auto", *DTYPES), "dtype")


class Evaluate(Section):
    """Perplexity of the output and of the original on the same held-out tokens; recorded in the card."""

    dataset: str = "self"
    samples: int = Field(32, ge=1)
    seq_len: int = Field(512, ge=2)
    batch_size: int = Field(1, ge=1)
    seed: int = 1
    device: str = "auto"
    dtype: str = "auto"

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        return _one_of(v, ("auto", *DTYPES), "dtype")


class Profile(Section):
    """Profile the output's retrieval heads and attach the profile to it (see `kvconvert profile`)."""

    block: int = Field(512, ge=16)
    repeats: int = Field(4, ge=2)
    seeds: int = Field(3, ge=1)
    induction: float = Field(0.14, ge=0, le=1)
    echo: float = Field(0.01, ge=0, le=1)
    sinks: int = Field(4, ge=0)
    window_floor: int = Field(256, ge=1)
    window_fraction: float = Field(0.1, ge=0, le=1)
    device: str = "auto"


class Push(Section):
    repo_id: str
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None
    create_pr: bool = False


class Recipe(Section):
    model: str
    """Checkpoint directory, Hub id, .gguf file, or `smollm2`."""
    revision: str | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    output: Path
    overwrite: bool = False
    calibrate: Calibrate = Field(default_factory=Calibrate)
    compress: Compress
    heal: Heal | None = None
    eval: Evaluate | None = None
    profile: Profile | None = None
    push: Push | None = None


def _section_fields(loc: tuple) -> list[str]:
    """Valid keys of the section at `loc` (a pydantic error location ending in the bad key)."""
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        candidates = [a for a in (getattr(ann, "__args__", None) or (ann,)) if isinstance(a, type)]
        sub = next((a for a in candidates if issubclass(a, BaseModel)), None)
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


def describe_error(exc: ValidationError) -> str:
    """All problems of a recipe on one line, unknown keys with their closest valid key."""
    parts = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(map(str, loc))
        if err["type"] == "extra_forbidden":
            valid = _section_fields(loc)
            near = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            parts.append(f"unknown key {key}{hint}; valid here: {', '.join(valid)}")
        elif err["type"] == "missing":
            parts.append(f"{key} is required")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"{key}: {msg}")
    return "; ".join(parts)


def apply_override(data: dict, assignment: str) -> None:
    """`a.b.c=VALUE` sets data[a][b][c] to VALUE read as YAML (so numbers, booleans and null keep their type)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise KVConvertError(f"--set {assignment!r} is not KEY=VALUE (e.g. --set push.repo_id=me/model)")
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise KVConvertError(f"--set {key}: {part} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw else None


def parse_recipe(data: Any, where: str) -> Recipe:
    if not isinstance(data, dict):
        raise KVConvertError(f"recipe {where} is not a YAML mapping; start from a file in recipes/")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise KVConvertError(f"recipe {where}: {describe_error(exc)}") from None


def load_recipe(path: Path, overrides: list[str] = ()) -> Recipe:
    """Read, override (`--set`) and validate a recipe file."""
    if not path.is_file():
        raise KVConvertError(f"recipe {path} does not exist; see recipes/ for examples")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise KVConvertError(f"recipe {path} is not valid YAML{where}; fix the syntax") from None
    data = data if data is not None else {}
    for assignment in overrides:
        if isinstance(data, dict):
            apply_override(data, assignment)
    return parse_recipe(data, str(path))


def describe(recipe: Recipe) -> list[str]:
    """The steps `run_recipe` takes, one line each."""
    cal, comp = recipe.calibrate, recipe.compress
    stats = f"-> {cal.stats} (reused if it matches)" if cal.stats else "(statistics kept in a temporary file)"
    lines = [
        f"model: {recipe.model}" + (f" @ {recipe.revision}" if recipe.revision else ""),
        f"1. calibrate: {cal.dataset}, {cal.samples} x {cal.seq_len} tokens, seed {cal.seed} {stats}",
        f"2. compress: --heads {comp.heads}, {comp.method}/{comp.grouping}"
        + (f", refine {comp.refine.steps} steps" if comp.refine.steps else "")
        + f" -> {recipe.output}",
    ]
    if recipe.heal:
        h = recipe.heal
        budget = f"{h.steps} steps" if h.steps else f"{h.tokens} tokens"
        lines.append(f"heal: {budget} of {' + '.join(h.datasets)}, train {h.train}, from {recipe.model}")
    if recipe.eval:
        e = recipe.eval
        lines.append(f"eval: {e.dataset}, {e.samples} x {e.seq_len} tokens, against {recipe.model}")
    if recipe.push:
        p = recipe.push
        mode = "pull request" if p.create_pr else f"branch {p.revision or 'main'}"
        lines.append(f"push: {p.repo_id} ({'private' if p.private else 'public'}, {mode})")
    return lines[:1] + [f"{i}. {line.removeprefix(f'{i}. ')}" for i, line in enumerate(lines[1:], 1)]
