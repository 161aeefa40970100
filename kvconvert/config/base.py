"""The base of every stage config: unknown keys are errors, values are checked once, errors are one line.

A config is a pydantic model. Its fields carry their CLI presentation (help text, help panel, metavar, flag) so
that `kvconvert.cli` builds each command's options from the configs instead of restating them.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvconvert.errors import KVConvertError

INPUT, CALIBRATION, MERGE, REFINE, OUTPUT, SAFETY = "Input", "Calibration", "Merge", "Refine", "Output", "Safety"
TRAINING, EVALUATION = "Training", "Evaluation"


def setting(
    default: Any = ...,
    help: str = "",
    panel: str = INPUT,
    *,
    flag: str | None = None,
    short: str | None = None,
    metavar: str | None = None,
    cli: bool = True,
    **constraints: Any,
) -> Any:
    """A config field with its help text and CLI presentation (`flag` defaults to the field name with dashes)."""
    extra = {"panel": panel, "flag": flag, "short": short, "metavar": metavar, "cli": cli}
    return Field(default, description=help, json_schema_extra=extra, **constraints)


class StageConfig(BaseModel):
    """One stage's settings. Invalid values raise `ConfigError` (a one-line `KVConvertError`)."""

    model_config = ConfigDict(extra="forbid")
    positional: ClassVar[tuple[str, ...]] = ()
    """Fields that may be given positionally, for callers written against the former request dataclasses."""

    def __init__(self, *args: Any, **data: Any) -> None:
        if len(args) > len(self.positional):
            raise TypeError(f"{type(self).__name__} takes at most {len(self.positional)} positional arguments")
        data.update(zip(self.positional, args, strict=False))
        try:
            super().__init__(**data)
        except ValidationError as exc:
            if _PARSING.get():  # a section of a larger config: its parse() reports the whole
                raise
            raise ConfigError(describe_error(exc, type(self))) from None

    @classmethod
    def parse(cls, data: Any, where: str, name: Callable[[tuple], str] | None = None):
        """Validate `data` (a mapping); errors become one `ConfigError` line starting with `where`."""
        token = _PARSING.set(True)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{where}{describe_error(exc, cls, name)}") from None
        finally:
            _PARSING.reset(token)


_PARSING: ContextVar[bool] = ContextVar("kvconvert_config_parsing", default=False)
"""True inside `StageConfig.parse` (pydantic validates nested configs through their `__init__`)."""


class ConfigError(KVConvertError):
    """A config value or key is invalid; the message names the key and what it accepts."""


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid keys of the section at `loc` (a pydantic error location ending in the bad key)."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        candidates = [a for a in (getattr(ann, "__args__", None) or (ann,)) if isinstance(a, type)]
        sub = next((a for a in candidates if issubclass(a, BaseModel)), None)
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


def describe_error(exc: ValidationError, root: type[BaseModel], name: Callable[[tuple], str] | None = None) -> str:
    """All problems on one line; unknown keys with their closest valid key. `name` spells a location."""
    name = name or (lambda loc: ".".join(map(str, loc)))
    parts = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = name(loc) if loc else root.__name__
        if err["type"] == "extra_forbidden":
            valid = _fields_at(root, loc)
            near = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            parts.append(f"unknown key {key}{hint}; valid here: {', '.join(valid)}")
        elif err["type"] == "missing":
            parts.append(f"{key} is required")
        elif err["type"] == "literal_error":
            parts.append(f"{key}: {err['input']!r} is not one of {err['ctx']['expected']}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"{key}: {msg}" if loc else msg)
    return "; ".join(parts)
