"""`sage llm bench`: not built yet."""

from __future__ import annotations

import typer

from sagellm_cli.core.errors import OperationFailed

app = typer.Typer(help="(not yet available)", invoke_without_command=True)


@app.callback()
def _not_yet() -> None:
    """Not built yet."""
    raise OperationFailed("`sage llm bench` is not built yet", hint="see the project's open issues")
