"""Command-line options written on dataclass fields: the one definition of each option.

GatewayConfig (`sage llm serve`) and EngineSpec (`sage llm engine start`) carry each
option's flags, help and command-line form in their fields' metadata (`option()`).
`cli_fields` reads them back with each field's type, default and bounds; cli/options.py
turns those into Typer parameters, and `to_fields` turns the parsed values into field
values. Nothing here imports typer or pydantic.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from sagellm_cli.core.errors import BadInput

# Where a field keeps its CliOption, and the mark of fields sagellm fills in itself.
CLI = "cli"
INTERNAL = "internal"


@dataclass(frozen=True)
class CliOption:
    """How one field appears on the command line.

    `flags` are Typer's declarations ("--engine-kind -k", "--use-gpu/--no-gpu"); empty
    means `--field-name`. `argument` makes it a positional argument instead. `to_field`
    turns the option's value into the field's where they differ (MiB vs bytes, repeated
    K=V vs a dict); it gets the value and the flag, for its error messages, and
    `cli_type` and `cli_default` are then the option's type and default.
    """

    flags: str = ""
    help: str | None = None
    envvar: str | None = None
    hidden: bool = False
    argument: bool = False
    cli_type: Any = None
    cli_default: Any = None
    to_field: Callable[[Any, str], Any] | None = None


def option(
    default: Any = dataclasses.MISSING,
    flags: str = "",
    help: str | None = None,
    *,
    factory: Any = None,
    **kw: Any,
) -> Any:
    """A dataclass field whose metadata describes its command-line option."""
    meta = {CLI: CliOption(flags, help, **kw)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class CliField:
    """One user-settable field as an option: what the CLI parses, and its lower bound."""

    name: str
    option: CliOption
    type: Any
    default: Any  # `...` for a required field
    min: float | None = None

    @property
    def flag(self) -> str:
        """The option's first long flag (`--engine-kind`), as error messages name it."""
        for decl in self.option.flags.replace("/", " ").split():
            if decl.startswith("--"):
                return decl
        return "--" + self.name.replace("_", "-")


class _Constraints:
    """Stands in for pydantic's Field in string annotations: keeps the lower bound only."""

    def __init__(self, *args: Any, ge: Any = None, **kwargs: Any):
        self.ge = ge


def _ignored(*args: Any, **kwargs: Any) -> None:
    return None


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _cli_type(hint: Any) -> Any:
    """The type the option parses: constraints dropped, a Literal as its values' type."""
    origin = typing.get_origin(hint)
    if origin is Annotated:
        return _cli_type(typing.get_args(hint)[0])
    if origin is Literal:
        return type(typing.get_args(hint)[0])
    if _is_union(hint):
        return functools.reduce(operator.or_, [_cli_type(a) for a in typing.get_args(hint)])
    return hint


def _minimum(hint: Any) -> Any:
    """`Field(ge=...)` of a scalar field (under `| None` too). Typer checks (and `--help`
    shows) lower bounds only; the strict model (core/inputs/spec_schema.py) checks the rest."""
    if _is_union(hint):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is Annotated:
        for meta in typing.get_args(hint)[1:]:
            if isinstance(meta, _Constraints):
                return meta.ge
    return None


@functools.cache
def cli_fields(cls: type) -> tuple[CliField, ...]:
    """The options of a dataclass's user-settable fields (not marked internal), in order.

    A field without a CliOption is `--field-name` with no help. Types, defaults and the
    lower bounds of `Field(ge=)` annotations come from the field itself.
    """
    hints = typing.get_type_hints(
        cls, localns={"Field": _Constraints, "BeforeValidator": _ignored}, include_extras=True
    )
    out = []
    for spec in dataclasses.fields(cls):
        if spec.metadata.get(INTERNAL):
            continue
        opt: CliOption = spec.metadata.get(CLI) or CliOption()
        if opt.to_field is not None:
            default = opt.cli_default
        elif spec.default is not dataclasses.MISSING:
            default = spec.default
        elif spec.default_factory is not dataclasses.MISSING:
            default = spec.default_factory()
        else:
            default = ...
        low = None if opt.cli_type else _minimum(hints[spec.name])
        kind = opt.cli_type or _cli_type(hints[spec.name])
        out.append(CliField(spec.name, opt, kind, default, low))
    return tuple(out)


def to_fields(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The field values of parsed options (`values` by field name), through `to_field`."""
    out = {}
    for cli_field in cli_fields(cls):
        value = values[cli_field.name]
        convert = cli_field.option.to_field
        out[cli_field.name] = convert(value, cli_field.flag) if convert else value
    return out


# -- converters, shared by the fields that take these forms -----------------------------


def as_list(values: list[str] | None, flag: str) -> list[str]:
    """A repeatable option's values as a list (none given: empty)."""
    return list(values or [])


def key_values(pairs: list[str] | None, flag: str) -> dict[str, str]:
    """Repeated `K=V` options (`--env`, `--lora-adapter`) as a dict."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BadInput(f"{flag} {pair!r} is not K=V", hint=f"write it as {flag} NAME=value")
        out[key] = value
    return out


def index_list(text: str | None, flag: str) -> list[int] | None:
    """`0,1` as [0, 1] (not given: None)."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BadInput(f"{flag} {text!r} is not a comma-separated list of integers") from None


def duration(text: str, flag: str) -> float:
    """`30s`, `5m`, `-1` as seconds (core/inputs/durations.py)."""
    from sagellm_cli.core.inputs.durations import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise BadInput(f"{flag}: {exc}") from None
