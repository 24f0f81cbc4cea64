"""Typer parameters built from a dataclass's option fields (core/inputs/options.py).

`sage llm serve` (GatewayConfig) and `sage llm engine start` (EngineSpec) build their
options this way, so an option's flags, help, type and default are written once, on
the field.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import typer

from sagellm_cli.core.inputs.options import cli_fields

KW = inspect.Parameter.KEYWORD_ONLY
# (parameter name, annotation, typer.Option/Argument): a command's own options.
Params = list[tuple[str, Any, Any]]


def field_parameters(cls: type) -> list[inspect.Parameter]:
    """One Typer option (or argument) per user-settable field of `cls`, in field order."""
    params = []
    for f in cli_fields(cls):
        opt = f.option
        if opt.argument:
            info = typer.Argument(f.default, help=opt.help)
        else:
            info = typer.Option(
                f.default, *opt.flags.split(), help=opt.help, envvar=opt.envvar,
                hidden=opt.hidden, show_envvar=bool(opt.envvar), min=f.min,
            )  # fmt: skip
        params.append(inspect.Parameter(f.name, KW, default=info, annotation=f.type))
    return params


def with_parameters(fn: Callable[..., Any], params: list[inspect.Parameter]) -> Callable:
    """`fn(**values)` with the signature Typer reads its options from."""
    fn.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    fn.__annotations__ = {p.name: p.annotation for p in params}
    return fn


def own_parameters(options: Params) -> list[inspect.Parameter]:
    """A command's own (non-field) options as parameters."""
    return [inspect.Parameter(n, KW, default=d, annotation=t) for n, t, d in options]
