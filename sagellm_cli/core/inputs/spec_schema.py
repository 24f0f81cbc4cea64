"""The strict pydantic model of an engine's options, derived from `EngineSpec`.

`EngineSpec` (core/records.py) is the one definition of the fields; this module turns
its string annotations into a pydantic model, so that presets, the management API and
`sage llm engine start` reject the same bad values with the same messages. pydantic is
imported here only, never on `engine list`'s path.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model

from sagellm_cli.core import records
from sagellm_cli.core.errors import BadInput
from sagellm_cli.core.inputs import options
from sagellm_cli.core.records import EngineSpec

# Strict: "2" is not an int, 1 is not a string; finite numbers only; unknown keys are errors.
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


@functools.cache
def engine_options_model(*, preset: bool = False) -> type[BaseModel]:
    """The pydantic model of the user-settable EngineSpec fields (cached).

    With `preset`, the defaults of preset engines (records.PRESET_DEFAULTS) apply.
    """
    hints = typing.get_type_hints(
        EngineSpec,
        globalns=vars(records),
        localns={"Field": Field, "BeforeValidator": BeforeValidator},
        include_extras=True,
    )
    fields: dict[str, Any] = {}
    for spec_field in dataclasses.fields(EngineSpec):
        if spec_field.metadata.get(options.INTERNAL):
            continue
        if preset and spec_field.name in records.PRESET_DEFAULTS:
            default: Any = records.PRESET_DEFAULTS[spec_field.name]
        elif spec_field.default is not dataclasses.MISSING:
            default = spec_field.default
        elif spec_field.default_factory is not dataclasses.MISSING:
            default = Field(default_factory=spec_field.default_factory)
        else:
            default = ...
        fields[spec_field.name] = (hints[spec_field.name], default)
    name = "PresetEngineOptions" if preset else "EngineOptions"
    return create_model(name, __config__=STRICT, **fields)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def error_message(err: dict[str, Any], key: str | None) -> str:
    """One pydantic error as the user reads it: `key 'port': <what> (got 'abc')`.

    Shared by the preset schema (which adds file and line) and the management API.
    """
    message = err["msg"]
    if "input" in err and err["type"] != "missing":
        message = f"{message} (got {_short(err['input'])})"
    return f"key {key!r}: {message}" if key else message


def key_path(loc: tuple[Any, ...]) -> str | None:
    """`('env', 'A')` -> `env.A`, `('gpus', 0)` -> `gpus[0]`."""
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    return text or None


def parse_engine_options(data: Any, *, what: str = "engine spec") -> EngineSpec:
    """Validate a dict of options (an API body, a converted CLI call) into an EngineSpec.

    Raises BadInput (exit 2 / HTTP 400) naming the first bad field.
    """
    if not isinstance(data, dict):
        raise BadInput(f"the {what} must be a JSON object with at least 'model'")
    try:
        options = engine_options_model().model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        loc = tuple(first["loc"])
        if first["type"] == "extra_forbidden":
            message = f"unknown field {str(loc[-1])!r}"
            hint = "accepted: " + ", ".join(records.option_fields())
        elif first["type"] == "missing":
            message, hint = f"{key_path(loc)!r} is required", None
        else:
            message, hint = error_message(first, key_path(loc)), None
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise BadInput(f"invalid {what}: {message}{more}", hint=hint) from None
    return EngineSpec(**options.model_dump())


def check_spec(spec: EngineSpec) -> None:
    """Validate an EngineSpec built in code (the CLI's options) against the same model."""
    data = {k: v for k, v in spec.to_dict().items() if k in records.option_fields()}
    parse_engine_options(data)
