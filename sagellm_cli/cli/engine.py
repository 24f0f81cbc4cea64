"""`sage llm engine`: start, stop, list, show, logs, restart, prune, lora."""

from __future__ import annotations

import sys
import time

import typer

from sagellm_cli.cli.common import (
    PlainProgress,
    check_timeout,
    emit_json,
    info,
    parse_env,
    parse_index_list,
    status_color,
    stderr_console,
    stderr_is_terminal,
    stdout_console,
    uptime,
)
from sagellm_cli.core.errors import BadInput, ExitCode
from sagellm_cli.core.lifecycle import Status
from sagellm_cli.core.records import spec_default

app = typer.Typer(help="Start, stop and inspect engines.", no_args_is_help=True)


def _manager():
    from sagellm_cli.core.engines import EngineManager

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


@app.command("start")
def start(
    model: str = typer.Argument(..., help="Model path or Hugging Face id."),
    engine_kind: str = typer.Option(
        spec_default("kind"), "--engine-kind", "-k", help="llm or embedding."
    ),
    runtime: str | None = typer.Option(
        None, help="vllm (llm, embedding) or sentence-transformers (embedding, default)."
    ),
    use_gpu: bool | None = typer.Option(
        None, "--use-gpu/--no-gpu", help="Default: llm on a GPU when one exists, embedding on CPU."
    ),
    tensor_parallel: int = typer.Option(
        spec_default("tensor_parallel"), "--tensor-parallel", "-tp", min=1
    ),
    pipeline_parallel: int = typer.Option(
        spec_default("pipeline_parallel"), "--pipeline-parallel", "-pp", min=1
    ),
    port: int | None = typer.Option(None, help="Default: a free port."),
    host: str = typer.Option(spec_default("host"), help="Address the engine binds."),
    label: str | None = typer.Option(None, help="A name to refer to the engine by."),
    served_model_name: str | None = typer.Option(None, help="Default: MODEL as given."),
    max_model_len: int | None = typer.Option(None, min=1),
    kv_cache_gb: float | None = typer.Option(None, help="KV-cache bound in GiB (CPU default 1)."),
    gpu_memory_gb: float | None = typer.Option(None, help="Override the GPU memory estimate."),
    gpus: str | None = typer.Option(None, help="Pin NVML GPU indices, e.g. 0,1."),
    placement: str = typer.Option(
        spec_default("placement"), help="GPU placement: pack (best fit) or spread."
    ),
    role: str = typer.Option(
        spec_default("role"), help="general, prefill or decode (length routing)."
    ),
    max_inflight: int | None = typer.Option(
        None, min=1, help="Gateway scheduling: requests in flight at once on this engine."
    ),
    cost_per_1k_tokens: float | None = typer.Option(
        None, min=0, help="Gateway `cost` scheduling: this engine's price per 1k tokens."
    ),
    cache: str = typer.Option(
        spec_default("cache"),
        help="vLLM's compile cache: shared (vLLM's own, reused) or private (this engine's).",
    ),
    restart: str = typer.Option(
        spec_default("restart"),
        help="While `sage llm serve` runs: no, on-failure or always restart a crashed engine.",
    ),
    max_restarts: int = typer.Option(
        spec_default("max_restarts"),
        min=0,
        help="Restarts within 10 minutes before the engine is failed as a crash loop.",
    ),
    keep_alive: str = typer.Option(
        "-1",
        help="Unload after this long without requests (30s, 5m, 1h; 0 = after each use; "
        "-1 = never). With --no-wait and 0, the engine loads on its first request.",
    ),
    unload: str = typer.Option(
        spec_default("unload"),
        help="How an idle engine unloads: stop (the process) or sleep (vLLM sleep mode, GPU).",
    ),
    cluster: str | None = typer.Option(
        None,
        help="Place the engine on a Ray cluster's node: ray://HOST:PORT or the head's "
        "HOST:PORT (default: $SAGELLM_RAY_ADDRESS; docs/cluster.md).",
    ),
    enable_lora: bool = typer.Option(
        spec_default("enable_lora"),
        "--enable-lora",
        help="Serve LoRA adapters (vLLM), added with `sage llm engine lora add`.",
    ),
    max_lora_rank: int | None = typer.Option(
        None, min=1, help="The largest adapter rank to serve (vLLM's default: 16)."
    ),
    lora_adapter: list[str] | None = typer.Option(
        None, "--lora-adapter", help="NAME=PATH of a LoRA adapter to load (repeatable)."
    ),
    extra_arg: list[str] | None = typer.Option(
        None, "--extra-arg", help="Passed to the runtime verbatim (repeatable)."
    ),
    env: list[str] | None = typer.Option(None, "--env", help="K=V for the engine (repeatable)."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until the engine is ready."),
    timeout: float = typer.Option(600.0, help="Seconds to wait for readiness."),
    json_out: bool = typer.Option(False, "--json", help="Print the record as JSON."),
) -> None:
    """Start an engine and wait until it serves requests."""
    from sagellm_cli.core.records import EngineSpec

    check_timeout(timeout)
    if engine_kind not in ("llm", "embedding"):
        raise BadInput(
            f"unknown engine kind {engine_kind!r}", hint="use --engine-kind llm or embedding"
        )
    spec = EngineSpec(
        model=model,
        kind=engine_kind,
        runtime=runtime,
        use_gpu=use_gpu,
        tensor_parallel=tensor_parallel,
        pipeline_parallel=pipeline_parallel,
        port=port,
        host=host,
        label=label,
        served_model_name=served_model_name,
        max_model_len=max_model_len,
        kv_cache_gb=kv_cache_gb,
        gpu_memory_gb=gpu_memory_gb,
        gpus=parse_index_list(gpus, "--gpus"),
        placement=placement,
        role=role,
        max_inflight=max_inflight,
        cost_per_1k_tokens=cost_per_1k_tokens,
        cache=cache,
        restart=restart,
        max_restarts=max_restarts,
        keep_alive=_duration(keep_alive, "--keep-alive"),
        unload=unload,
        cluster=cluster,
        enable_lora=enable_lora,
        max_lora_rank=max_lora_rank,
        lora_adapters=parse_env(lora_adapter, "--lora-adapter"),
        extra_args=list(extra_arg or []),
        env=parse_env(env),
    )
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
    from sagellm_cli.core.external import Registration, register

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


def _duration(text: str, flag: str) -> float:
    from sagellm_cli.core.durations import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise BadInput(f"{flag}: {exc}") from None


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
        from sagellm_cli.core.supervision import unsupervised

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
    from sagellm_cli.core import logs

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
    from sagellm_cli.core.lora import add_adapter

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
    from sagellm_cli.core.lora import remove_adapter

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
    from sagellm_cli.core.lora import list_adapters

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
