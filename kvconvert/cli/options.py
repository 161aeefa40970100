"""Command options built from the stage configs (`kvconvert.config`): each option's help, panel, metavar, flag
and default come from its config field, so no command restates them, and values are checked by the config, so
a bad value gets the same one-line error as in a recipe."""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import typer
from pydantic import BaseModel
from pydantic_core import PydanticUndefined
from typer.core import TyperCommand

from kvconvert.config import CalibrateConfig, CalibrateRequest, ConfigError, SourceConfig

METAVARS = {int: "N", float: "X", str: "TEXT", Path: "PATH", bool: ""}
PANELS = ("Input", "Calibration", "Merge", "Refine", "Training", "Evaluation", "Runtime", "Output", "Safety")


class Command(TyperCommand):
    """A typer command whose usage line reads `MODEL`, not `{MODEL}`, and whose flags show no `<bool>`."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [p[1:-1] if p[:1] == "{" and p[-1:] == "}" else p for p in super().collect_usage_pieces(ctx)]

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


@dataclass(frozen=True)
class Group:
    """The options of one config: `nested` maps a sub-config field to its flag prefix ("" for none);
    `arguments` are positional, in this order; `skip` fields are not on the command line."""

    config: type[BaseModel]
    arguments: tuple[str, ...] = ()
    nested: dict[str, str] = field(default_factory=dict)
    skip: tuple[str, ...] = ()
    prefix: str = ""

    def fields(self):
        for name, info in self.config.model_fields.items():
            extra = info.json_schema_extra or {}
            if name in self.skip or not extra.get("cli", True):
                continue
            if name in self.nested:
                yield name, Group(_model_of(info.annotation), prefix=self.nested[name])
            elif not _model_of(info.annotation):
                yield name, info

    def parameters(self) -> list[inspect.Parameter]:
        """The typer parameters of every field (arguments first)."""
        params = []
        for name, info in self.fields():
            if isinstance(info, Group):
                params += info.parameters()
            else:
                params.append(_parameter(self._key(name), self._flag(name, info), info, name in self.arguments))
        order = {self._key(a): i for i, a in enumerate(self.arguments)}
        return sorted(params, key=lambda p: order.get(p.name, len(order)))

    def fill(self, values: dict[str, Any], **extra: Any) -> Any:
        """The config from parsed `values` (plus `extra` fields); errors name the command-line flags."""
        names: dict[tuple, str] = {}
        data = {**self._data(values, names, ()), **extra}
        return self.config.parse(data, "", lambda loc: names.get(loc, ".".join(map(str, loc))))

    def _data(self, values: dict, names: dict, loc: tuple) -> dict:
        data = {}
        for name, info in self.fields():
            if isinstance(info, Group):
                data[name] = info._data(values, names, (*loc, name))
            else:
                key = self._key(name)
                names[(*loc, name)] = key.upper() if name in self.arguments else self._flag(name, info)[0]
                data[name] = values[key]
        return data

    def _key(self, name: str) -> str:
        return f"{self.prefix}_{name}" if self.prefix else name

    def _flag(self, name: str, info) -> list[str]:
        extra = info.json_schema_extra or {}
        flag = "--" + (extra.get("flag") or self._key(name)).replace("_", "-")
        if info.annotation is bool and info.default is True:
            flag = f"{flag}/--no-{flag.removeprefix('--')}"
        return [flag, *([extra["short"]] if extra.get("short") else [])]


def _model_of(annotation) -> type[BaseModel] | None:
    for a in (annotation, *get_args(annotation)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _plain(annotation):
    """The type typer parses (Optional removed, Literal as str, list[int] as one comma-separated str)."""
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if get_origin(annotation) is Literal:
        return str, "|".join(get_args(annotation))
    if get_origin(annotation) is list:
        return (list[str], None) if get_args(annotation)[0] is str else (str, None)
    return annotation, None


def _parameter(key: str, flags: list[str], info, argument: bool) -> inspect.Parameter:
    extra = info.json_schema_extra or {}
    kind, choices = _plain(info.annotation)
    default = ... if info.default is PydanticUndefined else info.default
    if info.default_factory is not None:
        default = info.default_factory()
    if isinstance(default, list) and kind is str:  # a list typed as one comma-separated string
        default = ",".join(map(str, default))
    if argument:
        metavar = extra.get("metavar") or key.upper()
        param = typer.Argument(default, help=info.description, metavar=metavar)
    else:
        metavar = extra.get("metavar") or choices or METAVARS.get(kind, "TEXT")
        param = typer.Option(default, *flags, help=info.description, metavar=metavar, rich_help_panel=extra["panel"])
    return inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=param, annotation=kind)


def command(app: typer.Typer, name: str, group: Group | None = None, extra: tuple = ()) -> Callable:
    """Register `body(config, **extra values)` as command `name` with the options of `group` plus `extra`.

    The config is filled and checked first; the heavy libraries are imported (and quietened) only after that,
    so argument errors are fast.
    """

    def register(body: Callable) -> Callable:
        own = [p.name for p in extra]

        @functools.wraps(body)
        def run(**values: Any) -> Any:
            from kvconvert.cli import click_errors, quiet_libraries

            rest = {k: values.pop(k) for k in own}
            try:
                config = group.fill(values) if group else None
            except ConfigError as exc:  # a bad option value is a usage error (exit 2), like typer's own
                raise click_errors.UsageError(str(exc)) from None
            quiet_libraries()
            return body(config, **rest) if group else body(**rest)

        params = (group.parameters() if group else []) + list(extra)
        params.sort(key=_order)
        run.__signature__ = inspect.Signature(params)
        run.__annotations__ = {p.name: p.annotation for p in params}
        del run.__wrapped__
        app.command(name, cls=Command)(run)
        return body

    return register


def _order(param: inspect.Parameter) -> tuple[int, int]:
    """Arguments first (in their order), then options panel by panel."""
    if isinstance(param.default, typer.models.ArgumentInfo):
        return (0, 0)
    panel = param.default.rich_help_panel
    return (1, PANELS.index(panel) if panel in PANELS else len(PANELS))


def flag(default: Any, *flags: str, help: str, panel: str, kind: type = bool, metavar: str | None = None):
    """An option that is the command's own (not a config field), e.g. `--json`."""
    key = flags[0].lstrip("-").split("/")[0].replace("-", "_")
    metavar = metavar if metavar is not None else METAVARS.get(kind)
    option = typer.Option(default, *flags, help=help, rich_help_panel=panel, metavar=metavar)
    return inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)


def argument(key: str, kind: type, help: str, metavar: str) -> inspect.Parameter:
    """A positional argument that is the command's own (not a config field)."""
    param = typer.Argument(..., help=help, metavar=metavar)
    return inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=param, annotation=kind)


def _former(config: type[BaseModel], name: str, argument: bool = False):
    """A typer parameter for one config field, for commands still written against the former shared options."""
    group = Group(config, arguments=(name,) if argument else ())
    info = config.model_fields[name]
    return _parameter(name, group._flag(name, info), info, argument).default


# The former shared options, for commands written against them (new commands use a `Group` of their config).
Model, AllowPickle, TrustRemoteCode = (
    _former(SourceConfig, name, argument=name == "model") for name in ("model", "allow_pickle", "trust_remote_code")
)
Dataset, Samples, SeqLen, BatchSize, Device, Dtype, Seed, TextField, OffloadDir = (
    _former(CalibrateConfig, name)
    for name in ("dataset", "samples", "seq_len", "batch_size", "device", "dtype", "seed", "text_field", "offload_dir")
)
Output = _former(CalibrateRequest, "output")


def path_or_none(value: str | None) -> Path | None:
    """Former helper: a path, or None for an empty value."""
    return Path(value) if value else None
