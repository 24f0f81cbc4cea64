"""`sage llm model`: the local model cache (list, import-gguf, prepare-demo, pull, rm, resolve)."""

from __future__ import annotations

import time

import typer

from sagellm_cli.cli.common import emit_json, info, stderr_console, stdout_console

app = typer.Typer(help="Manage the local model cache.", no_args_is_help=True)


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def _with_spinner(title: str, work, *, quiet: bool):
    """Run `work(on_progress)` with a spinner showing the stage and elapsed time on stderr."""
    if quiet:
        return work(None)
    from rich.markup import escape

    started = time.monotonic()
    stage = {"text": "starting"}
    console = stderr_console()
    status = console.status("")

    def render() -> None:
        status.update(
            f"[bold]{escape(title)}[/] [cyan]{time.monotonic() - started:5.0f}s[/]  "
            f"[dim]{escape(stage['text'])}[/]"
        )

    def on_progress(text: str) -> None:
        stage["text"] = text
        render()

    # Rich refreshes the spinner on its own thread, but the elapsed time is part of the
    # text, so a small ticker keeps it moving between stage changes.
    import threading

    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(1.0):
            render()

    ticker = threading.Thread(target=tick, daemon=True)
    render()
    with status:
        ticker.start()
        try:
            return work(on_progress)
        finally:
            stop.set()
            ticker.join(timeout=2)


@app.command("list")
def list_models(json_out: bool = typer.Option(False, "--json")) -> None:
    """List the models in the local cache."""
    from sagellm_cli.core.models import cache as model_cache
    from sagellm_cli.core.paths import models_dir

    models = model_cache.list_cached()
    if json_out:
        emit_json([m.to_dict() for m in models])
        return
    if not models:
        info(f"no cached models in {models_dir()} (try `sage llm model prepare-demo`)")
        return
    from rich.table import Table

    table = Table(title=f"models in {models_dir()}", title_justify="left")
    for column in ("NAME", "SIZE", "SOURCE", "PATH"):
        table.add_column(column, overflow="fold")
    for m in models:
        table.add_row(m.name, _human_size(m.size_bytes), m.source, m.path)
    stdout_console().print(table)


@app.command("resolve")
def resolve(
    name: str = typer.Argument(..., help="A path, cached name or Hugging Face id."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Show where a model name loads from and what is passed to the runtime."""
    from sagellm_cli.core.models import cache as model_cache

    resolved = model_cache.resolve_model(name)
    data = resolved.to_dict()
    data["argument"] = resolved.argument
    if json_out:
        emit_json(data)
        return
    where = resolved.path or "(not on this machine: the runtime would download it)"
    typer.echo(f"{name}: {resolved.source} -> {where}")


@app.command("import-gguf")
def import_gguf(
    file: str = typer.Argument(..., help="The .gguf file to convert."),
    name: str = typer.Option(..., "--name", "-n", help="Name in the cache, e.g. my-model."),
    force: bool = typer.Option(False, "--force", help="Replace an entry of the same name."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Convert a GGUF checkpoint into a served-ready folder in the cache (bf16 safetensors)."""
    from sagellm_cli.core.models import cache as model_cache

    model = _with_spinner(
        f"converting {name}",
        lambda cb: model_cache.import_gguf(file, name, on_progress=cb, replace=force),
        quiet=json_out,
    )
    _report(model, json_out, created=True)


@app.command("prepare-demo")
def prepare_demo(json_out: bool = typer.Option(False, "--json")) -> None:
    """Put the offline demo model (Gemma 3 270M base) into the cache; a no-op when it's there."""
    from sagellm_cli.core.models import cache as model_cache

    model, created = _with_spinner(
        f"preparing {model_cache.DEMO_MODEL_NAME} (about 2 minutes, 3.5 GB RAM)",
        lambda cb: model_cache.prepare_demo(on_progress=cb),
        quiet=json_out,
    )
    _report(model, json_out, created=created)


@app.command("pull")
def pull(
    hub_id: str = typer.Argument(..., help="Hugging Face id, ORG/NAME."),
    force: bool = typer.Option(False, "--force", help="Replace an entry of the same name."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Download a model from the Hugging Face hub into the cache (needs the network)."""
    from sagellm_cli.core.models import cache as model_cache

    if not json_out:
        info(f"downloading {hub_id} ...")
    model = model_cache.pull(hub_id, replace=force)
    _report(model, json_out, created=True)


@app.command("rm")
def rm(
    name: str = typer.Argument(..., help="Name of a cached model."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Delete a model from the cache."""
    from sagellm_cli.core.models import cache as model_cache

    model = model_cache.remove(name)
    if json_out:
        emit_json({**model.to_dict(), "removed": True})
    else:
        info(f"removed {model.name} ({_human_size(model.size_bytes)})")


def _report(model, json_out: bool, *, created: bool) -> None:
    if json_out:
        emit_json({**model.to_dict(), "created": created})
        return
    verb = "ready" if created else "already in the cache"
    info(f"{model.name} {verb}: {model.path} ({_human_size(model.size_bytes)})")
    typer.echo(model.path)
