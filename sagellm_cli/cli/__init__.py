"""Thin Typer commands: parse, call the core, render as rich tables or JSON."""
