"""`sage llm engine`: start, hold, stop, list, show, logs, restart, prune, lora."""

from __future__ import annotations

import sys
import time

import typer

from sagellm_cli.cli.common import (
    PlainProgress,
    check_timeout,
    emit_json,
    info,
    status_color,
    stderr_console,
    stderr_is_terminal,
    stdout_console,
    uptime,
)
from sagellm_cli.cli.options import Params, field_parameters, own_parameters, with_parameters
from sagellm_cli.core.errors import BadInput, ExitCode
from sagellm_cli.core.lifecycle import Status
from sagellm_cli.core.records import EngineSpec, spec_default

app = typer.Typer(help="Start, stop and inspect engines.", no_args_is_help=True)


def _manager():
    from sagellm_cli.core.engines.manager import EngineManager

    return EngineManager()


def _spinner_progress(console):
    """A progress callback that renders one status line with a spinner."""
    from rich.markup import escape

    status = console.status("")

    def update(progress) -> None:
        line = progress.last_log_line
        status.update(
            f"[bold]{progress.engine_id}[/] {progress.status} "
            f"[cyan]{progress.elapsed:5.0f}s[/]  [dim]{escape(line)}[/]"
        )

    return status, update


def wait_with_spinner(wait_fn, *, quiet: bool):
    """Run a blocking wait, with a spinner on stderr (plain lines when piped) unless `quiet`."""
    if quiet:
        return wait_fn(None)
    if not stderr_is_terminal():
        plain = PlainProgress()
        return wait_fn(lambda p: plain.report(p.engine_id, p.status, p.elapsed, p.last_log_line))
    status, update = _spinner_progress(stderr_console())
    with status:
        return wait_fn(update)


# `engine start`'s own options; every other one is an EngineSpec field (core/records.py).
_START_OPTIONS: Params = [
    ("wait", bool, typer.Option(True, "--wait/--no-wait", help="Wait until the engine is ready.")),
    ("timeout", float, typer.Option(600.0, help="Seconds to wait for readiness.")),
    ("json_out", bool, typer.Option(False, "--json", help="Print the record as JSON.")),
]


def start(**values) -> None:
    """Start an engine and wait until it serves requests."""
    from sagellm_cli.core.inputs.options import to_fields

    wait, timeout, json_out = values.pop("wait"), values.pop("timeout"), values.pop("json_out")
    check_timeout(timeout)
    spec = EngineSpec(**to_fields(EngineSpec, values))  # validated by core before it starts
    manager = _manager()
    # Without --wait, core decides whether the engine loads now or on first use (lazy).
    record = manager.spawn(spec) if wait else manager.start(spec, wait=False)
    if record.status == Status.IDLE:
        if json_out:
            emit_json(record.to_dict())
        else:
            info(f"engine {record.id} registered: it loads on the first request to the gateway")
            typer.echo(record.id)
        return
    if not json_out:
        info(f"engine {record.id} starting on {record.url} (log: {record.log_path})")
        for note in record.notes:
            info(f"engine {record.id}: {note}")
    if wait:
        try:
            record = wait_with_spinner(
                lambda cb: manager.wait_ready(record.id, timeout=timeout, on_progress=cb),
                quiet=json_out,
            )
        except KeyboardInterrupt:
            info(f"interrupted: stopping engine {record.id}")
            manager.stop(record.id)
            raise typer.Exit(ExitCode.INTERRUPTED) from None
    if json_out:
        emit_json(record.to_dict())
    else:
        info(
            f"engine {record.id} {record.status}: {record.url}/v1 serves {record.served_model_name!r}"
        )
        typer.echo(record.id)


app.command("start")(
    with_parameters(start, field_parameters(EngineSpec) + own_parameters(_START_OPTIONS))
)


@app.command("hold")
def hold(
    ref: str = typer.Argument(..., help="Engine id, label or unique id prefix."),
    duration: str = typer.Option(
        ..., "--for", help="How long the scheduler must not unload it (10m, 2h; 0 ends it)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the record as JSON."),
) -> None:
    """Lease an engine for a batch job: the gateway never unloads it until the lease ends."""
    from sagellm_cli.core.inputs.options import duration as parse_duration

    record = _manager().hold(ref, parse_duration(duration, "--for"))
    if json_out:
        emit_json(record.to_dict())
    elif record.held_until:
        info(f"engine {record.id} held for {duration}: the scheduler will not unload it")
    else:
        info(f"engine {record.id}: lease ended")


@app.command("register")
def register_external(
    url: str = typer.Argument(..., help="Base URL of an OpenAI-compatible server (no /v1)."),
    model: str | None = typer.Option(
        None, help="The model name it serves (default: its only one, from /v1/models)."
    ),
    engine_kind: str = typer.Option(
        spec_default("kind"), "--engine-kind", "--kind", "-k", help="llm or embedding."
    ),
    label: str | None = typer.Option(None, help="A name to refer to the engine by."),
    role: str = typer.Option(spec_default("role"), help="general, prefill or decode."),
    max_inflight: int | None = typer.Option(None, min=1, help="Gateway scheduling limit."),
    cost_per_1k_tokens: float | None = typer.Option(None, min=0, help="For `cost` scheduling."),
    check: bool = typer.Option(True, "--check/--no-check", help="Check URL/v1/models first."),
    json_out: bool = typer.Option(False, "--json", help="Print the record as JSON."),
) -> None:
    """Register an engine something else runs (Kubernetes, another vLLM, SGLang, llama.cpp):
    the gateway routes to it and health-checks it; `engine stop` only unregisters it."""
    from sagellm_cli.core.engines.external import Registration, register

    record = register(
        _manager(),
        Registration(url, model, engine_kind, label, role, max_inflight, cost_per_1k_tokens, check),
    )
    if json_out:
        emit_json(record.to_dict())
    else:
        info(f"engine {record.id} registered: {record.url} serves {record.served_model_name!r}")
        typer.echo(record.id)


@app.command("stop")
def stop(
    ref: str | None = typer.Argument(None, help="Engine id, id prefix or label."),
    all_engines: bool = typer.Option(False, "--all", help="Stop every engine."),
    timeout: float = typer.Option(30.0, help="Seconds to wait after SIGTERM before SIGKILL."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Stop an engine's whole process group; stopping a stopped engine is a no-op."""
    if (ref is None) == (not all_engines):
        raise BadInput("give an engine id or --all (not both)", hint="sage llm engine stop ID")
    check_timeout(timeout)
    manager = _manager()
    began = time.time()
    records = (
        manager.stop_all(timeout=timeout) if all_engines else [manager.stop(ref, timeout=timeout)]
    )
    if json_out:
        emit_json([r.to_dict() for r in records])  # always a list, one engine or --all
        return
    if not records:
        info("no running engines")
    for record in records:
        already = record.stopped_at is not None and record.stopped_at < began
        what = "unregistered (external: nothing was signalled)"
        status = what if record.is_external and record.status == Status.STOPPED else None
        info(f"engine {record.id} {'was already ' if already else ''}{status or record.status}")


def _render_table(records) -> None:
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in (
        "ID",
        "LABEL",
        "KIND",
        "RUNTIME",
        "MODEL",
        "PORT",
        "PID",
        "STATUS",
        "NODE",
        "GPUS",
        "UPTIME",
        "RESTARTS",
    ):
        table.add_column(column, overflow="fold")
    for r in records:
        status = r.status if r.exit_code is None or r.is_live else f"{r.status} ({r.exit_code})"
        if r.status == Status.RESTARTING and r.next_restart_at:
            status += f" in {max(r.next_restart_at - time.time(), 0):.0f}s"
        color = status_color(r.status)
        table.add_row(
            r.id,
            r.label or "-",
            r.kind,
            r.runtime,
            r.served_model_name,
            str(r.port),
            str(r.pid or "-"),
            f"[{color}]{status}[/]",
            r.node,
            ",".join(map(str, r.gpus)) or ("-" if r.is_external else "cpu"),
            uptime(r.started_at, r.has_process),
            str(r.restarts),
        )
    stdout_console().print(table)


@app.command("list")
def list_engines(
    all_engines: bool = typer.Option(False, "--all", "-a", help="Include stopped and failed."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """List engines with their status, reconciled with the running processes."""
    manager = _manager()
    state = manager.refresh()
    records = manager.list(include_all=all_engines, state=state)
    if json_out:
        emit_json([r.to_dict() for r in records])
    elif not records:
        info("no engines" + ("" if all_engines else " running (use --all to include stopped)"))
    else:
        _render_table(records)
        from sagellm_cli.core.engines.supervision import unsupervised

        unapplied = unsupervised(state)
        if unapplied:
            info(
                f"note: no `sage llm serve` runs, so restart policies and keep_alive of "
                f"{', '.join(unapplied)} are not applied (as docker's without dockerd)"
            )


@app.command("show")
def show(
    ref: str = typer.Argument(..., help="Engine id, id prefix or label."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Show one engine's full record."""
    record = _manager().get(ref)
    if json_out:
        emit_json(record.to_dict())
        return
    _render_record(record)


def _render_record(record) -> None:
    """`engine show`: the record as aligned `field  value` lines, like `gh pr view`."""
    import shlex

    from rich.markup import escape
    from rich.table import Table

    data = record.to_dict()  # secrets masked
    spec = data.pop("spec") or {}
    command = data.pop("command")
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in data.items():
        if value in (None, [], ""):
            continue
        table.add_row(
            key, escape(", ".join(map(str, value)) if isinstance(value, list) else str(value))
        )
    table.add_row("command", escape(shlex.join(command)) if command else "-")
    options = {k: v for k, v in spec.items() if v not in (None, [], {}, "")}
    table.add_row("spec", escape(" ".join(f"{k}={v}" for k, v in options.items())))
    stdout_console().print(table)


@app.command("logs")
def logs_cmd(
    ref: str = typer.Argument(..., help="Engine id, id prefix or label."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines."),
    lines: int = typer.Option(100, "--lines", "-n", min=0, help="How many lines of the tail."),
    json_out: bool = typer.Option(False, "--json", help="Print {id, log_path, lines} as JSON."),
) -> None:
    """Print an engine's log (stdout and stderr of its processes)."""
    from sagellm_cli.core.engines import logs

    manager = _manager()
    record = manager.get(ref, probe_health=False)
    tail = logs.tail_lines(record.log_path, lines)
    if json_out:
        emit_json({"id": record.id, "log_path": record.log_path, "lines": tail})
        return
    for line in tail:
        sys.stdout.write(line + "\n")
    sys.stdout.flush()
    if not follow:
        return
    try:
        for line in logs.follow(
            record.log_path, lambda: manager.get(record.id, probe_health=False).is_live
        ):
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass


@app.command("restart")
def restart(
    ref: str = typer.Argument(..., help="Engine id, id prefix or label."),
    wait: bool = typer.Option(True, "--wait/--no-wait"),
    timeout: float = typer.Option(600.0, help="Seconds to wait for readiness."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Restart an engine with the same id, port and options."""
    check_timeout(timeout)
    manager = _manager()
    record = wait_with_spinner(
        lambda cb: manager.restart(ref, wait=wait, timeout=timeout, on_progress=cb), quiet=json_out
    )
    if json_out:
        emit_json(record.to_dict())
    else:
        info(f"engine {record.id} {record.status}: {record.url}")


@app.command("prune")
def prune(json_out: bool = typer.Option(False, "--json")) -> None:
    """Remove stopped and failed engines, their leftover processes and logs."""
    removed = _manager().prune()
    if json_out:
        emit_json([r.id for r in removed])
    else:
        info(f"removed {len(removed)} engine record(s)")


lora_app = typer.Typer(
    help="LoRA adapters of a running vLLM engine (started with --enable-lora).",
    no_args_is_help=True,
)
app.add_typer(lora_app, name="lora")


@lora_app.command("add")
def lora_add(
    ref: str = typer.Argument(..., help="Engine id, id prefix or label."),
    name: str = typer.Argument(..., help="The adapter's model name for requests."),
    path: str = typer.Argument(..., help="The adapter's directory (PEFT format)."),
    json_out: bool = typer.Option(False, "--json", help="Print the engine record as JSON."),
) -> None:
    """Load an adapter into the engine and record it (a restart loads it again)."""
    from sagellm_cli.core.engines.lora import add_adapter

    record = add_adapter(_manager(), ref, name, path)
    if json_out:
        emit_json(record.to_dict())
    else:
        info(f"adapter {name!r} added to engine {record.id}: requests use model {name!r}")


@lora_app.command("remove")
def lora_remove(
    ref: str = typer.Argument(..., help="Engine id, id prefix or label."),
    name: str = typer.Argument(..., help="The adapter's name."),
    json_out: bool = typer.Option(False, "--json", help="Print the engine record as JSON."),
) -> None:
    """Unload an adapter from the engine and forget it."""
    from sagellm_cli.core.engines.lora import remove_adapter

    record = remove_adapter(_manager(), ref, name)
    if json_out:
        emit_json(record.to_dict())
    else:
        info(f"adapter {name!r} removed from engine {record.id}")


@lora_app.command("list")
def lora_list(
    ref: str = typer.Argument(..., help="Engine id, id prefix or label."),
    json_out: bool = typer.Option(False, "--json", help="Print [{name, path, loaded}]."),
) -> None:
    """The engine's adapters, and whether the engine has each loaded now."""
    from sagellm_cli.core.engines.lora import list_adapters

    record, adapters = list_adapters(_manager(), ref)
    if json_out:
        emit_json([a.to_dict() for a in adapters])
        return
    if not adapters:
        info(f"engine {record.id} has no LoRA adapters")
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("NAME", "PATH", "LOADED"):
        table.add_column(column, overflow="fold")
    for a in adapters:
        loaded = "-" if a.loaded is None else ("yes" if a.loaded else "no")
        table.add_row(escape(a.name), escape(a.path), loaded)
    stdout_console().print(table)
