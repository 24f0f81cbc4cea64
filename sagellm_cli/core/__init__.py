"""Pure logic behind the CLI and the gateway: no Typer or rich imports here."""
