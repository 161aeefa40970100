"""Recipes: one YAML file drives model -> calibrate -> compress -> heal -> eval -> push (`kvconvert run RECIPE.yaml`).

Every section is a stage config (`kvconvert.config`) that forbids unknown keys, so a typo is an error naming the key
(and the closest valid one), the same error the command line gives.
Relative paths are relative to the working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from kvconvert.config import (
    CalibrateConfig,
    CompressConfig,
    EvalConfig,
    HealConfig,
    PushConfig,
    RefineConfig,
    SourceConfig,
)
from kvconvert.config.matryoshka import MatryoshkaConfig
from kvconvert.config.profile import ProfileConfig
from kvconvert.errors import KVConvertError


class Calibrate(CalibrateConfig):
    """Calibration text and how much of it (see `kvconvert calibrate`)."""

    stats: Path | None = None
    """Keep the statistics here; a later run (another head count) reuses them if they match this section."""


# Former names of the sections (each is now the stage's own config).
Refine, Compress, Heal, Evaluate, Push = RefineConfig, CompressConfig, HealConfig, EvalConfig, PushConfig
Matryoshka, Profile = MatryoshkaConfig, ProfileConfig


class Recipe(SourceConfig):
    """model (and how to read it) -> calibrate -> compress -> heal -> eval -> push; each section is that stage's
    config (kvconvert.config), so a recipe accepts exactly what the commands accept."""

    output: Path
    overwrite: bool = False
    calibrate: Calibrate = Field(default_factory=Calibrate)
    compress: CompressConfig
    heal: HealConfig | None = None
    matryoshka: MatryoshkaConfig | None = None
    eval: EvalConfig | None = None
    profile: ProfileConfig | None = None
    push: PushConfig | None = None


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
    node[parts[-1]] = read_value(raw)


def read_value(raw: str) -> Any:
    """An override's VALUE as YAML; text YAML cannot parse (`@me`, `[1`) is taken as the plain string it is."""
    if not raw:
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def parse_recipe(data: Any, where: str) -> Recipe:
    if not isinstance(data, dict):
        raise KVConvertError(f"recipe {where} is not a YAML mapping; start from a file in recipes/")
    return Recipe.parse(data, f"recipe {where}: ")


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
    if recipe.matryoshka:
        m = recipe.matryoshka
        lines.append(
            f"matryoshka: {m.budget:g} of the KV cache, {m.steps} steps on {' + '.join(m.datasets)} -> {recipe.output}"
        )
    if recipe.eval:
        e = recipe.eval
        lines.append(f"eval: {e.dataset}, {e.samples} x {e.seq_len} tokens, against {recipe.model}")
    if recipe.profile:
        lines.append(f"profile: {recipe.profile.scoring} retrieval heads -> {recipe.output / 'razor_profile.json'}")
    if recipe.push:
        p = recipe.push
        mode = "pull request" if p.create_pr else f"branch {p.revision or 'main'}"
        lines.append(f"push: {p.repo_id} ({'private' if p.private else 'public'}, {mode})")
    return lines[:1] + [f"{i}. {line.removeprefix(f'{i}. ')}" for i, line in enumerate(lines[1:], 1)]
