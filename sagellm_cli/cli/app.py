"""The `sage` command: `sage llm engine|gpu|preset|serve|bench|model`."""

from __future__ import annotations

import importlib
import os
import sys

import typer
from typer.core import TyperGroup

from sagellm_cli import __version__
from sagellm_cli.core.errors import ExitCode, SageError

# `sage llm <group>` -> the module that defines it. Modules are imported only when their
# command runs (or for help), so `sage llm engine list` doesn't pay for the others.
LLM_GROUPS = {
    "engine": "sagellm_cli.cli.engine",
    "gpu": "sagellm_cli.cli.gpu",
    "preset": "sagellm_cli.cli.preset",
    "model": "sagellm_cli.cli.model",
    "bench": "sagellm_cli.cli.bench",
    "serve": "sagellm_cli.cli.serve",
    "top": "sagellm_cli.cli.top",
    "cluster": "sagellm_cli.cli.cluster",
}


def _report(exc: SageError) -> None:
    if exc.details:
        sys.stderr.write(exc.details.rstrip("\n") + "\n")
    sys.stderr.write(f"error: {exc.one_line()}\n")
    sys.stderr.flush()


class SageGroup(TyperGroup):
    """Turns expected errors into one stderr line and an exit code, for every subcommand."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SageError as exc:
            _report(exc)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            sys.stderr.write("interrupted\n")
            raise typer.Exit(ExitCode.INTERRUPTED) from None


app = typer.Typer(
    name="sage",
    cls=SageGroup,
    help="SAGE command line. `sage llm` manages local LLM and embedding engines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class LazyLlmGroup(TyperGroup):
    """`sage llm`: resolves its sub-commands from LLM_GROUPS on first use."""

    def list_commands(self, ctx):
        return sorted(LLM_GROUPS)

    def get_command(self, ctx, name):
        if name not in LLM_GROUPS:
            return None
        module = importlib.import_module(LLM_GROUPS[name])
        if hasattr(module, "register"):  # a single command (serve) rather than a group
            holder = typer.Typer(add_completion=False)
            module.register(holder)
            command = typer.main.get_command(holder)
        else:
            command = typer.main.get_command(module.app)
        command.name = name
        return command


llm = typer.Typer(
    cls=LazyLlmGroup, help="Run and manage LLM and embedding engines.", no_args_is_help=True
)
app.add_typer(llm, name="llm")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sage (sagellm-cli) {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """SAGE command line."""


def main() -> None:
    """Console entry point: expected errors become one line on stderr and an exit code."""
    try:
        app()
    except SageError as exc:  # raised outside a command, e.g. in a callback
        _report(exc)
        sys.exit(exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - last line of defence against tracebacks
        if os.environ.get("SAGELLM_DEBUG"):
            raise
        sys.stderr.write(
            f"error: internal error: {type(exc).__name__}: {exc} "
            "(set SAGELLM_DEBUG=1 for a traceback and report it)\n"
        )
        sys.exit(ExitCode.FAILED)
