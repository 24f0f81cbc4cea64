"""The `sage` command: `sage llm engine|gpu|preset|serve|bench|model`."""

from __future__ import annotations

import os
import sys

import typer
from typer.core import TyperGroup

from sagellm_cli import __version__
from sagellm_cli.cli import bench, engine, gpu, model, preset, serve
from sagellm_cli.core.errors import ExitCode, SageError


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
llm = typer.Typer(help="Run and manage LLM and embedding engines.", no_args_is_help=True)
app.add_typer(llm, name="llm")
llm.add_typer(engine.app, name="engine")
llm.add_typer(gpu.app, name="gpu")
llm.add_typer(preset.app, name="preset")
llm.add_typer(model.app, name="model")
llm.add_typer(bench.app, name="bench")
serve.register(llm)


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
