"""`sage llm serve`: not built yet."""

from __future__ import annotations

import typer

from sagellm_cli.core.errors import OperationFailed


def register(parent: typer.Typer) -> None:
    """Attach `serve` to the `llm` group."""

    @parent.command("serve", help="(not yet available) OpenAI-compatible gateway.")
    def serve() -> None:
        raise OperationFailed("`sage llm serve` is not built yet", hint="see the project's open issues")
