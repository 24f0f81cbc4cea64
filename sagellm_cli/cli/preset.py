"""`sage llm preset`: list, show, validate, apply and take down presets."""

from __future__ import annotations

import shlex
import sys
import threading
from pathlib import Path

import typer

from sagellm_cli.cli.common import (
    STATUS_COLORS,
    PlainProgress,
    emit_json,
    human_duration,
    info,
    stderr_console,
    stderr_is_terminal,
    stdout_console,
)
from sagellm_cli.core.errors import BadInput, OperationFailed, SageError
from sagellm_cli.core.lifecycle import Status

app = typer.Typer(
    help="Bring groups of engines up and down from YAML presets.", no_args_is_help=True
)

NAME_OPT = typer.Option(None, "--name", "-n", help="A built-in preset (see `preset list`).")
FILE_OPT = typer.Option(None, "--file", "-f", help="A preset YAML file.")


def _manager():
    from sagellm_cli.core.engines.manager import EngineManager

    return EngineManager()


def _load(name: str | None, file: Path | None, positional: str | None = None):
    from sagellm_cli.core import presets

    if positional is not None:
        if name is not None and name != positional:
            raise BadInput("give the preset name once", hint="sage llm preset show NAME")
        name = positional
    return presets.load(name=name, file=file)


# --------------------------------------------------------------------------- rendering


def _plan_table(plan):
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"preset {plan.preset}", title_justify="left")
    for column in ("ENGINE", "KIND", "MODEL", "LOCAL", "GPUS", "GIB", "PORT", "ACTION"):
        table.add_column(column, overflow="fold")
    for e in plan.engines:
        local = "yes" if e.model.exists_locally else "[yellow]no[/]"
        gib = f"{e.gib_per_gpu:.1f}" if e.gib_per_gpu else "-"
        action = e.action + (f" ({e.existing_id})" if e.existing_id else "")
        if e.blocker:
            action = f"[red]cannot {action}[/]"
        table.add_row(
            escape(e.label),
            e.spec.kind,
            escape(e.model.name),
            local,
            ",".join(map(str, e.gpus)) or "cpu",
            gib,
            str(e.port),
            action,
        )
    for r in plan.remove:
        table.add_row(
            escape(r.label or r.id), r.kind, escape(r.model), "-", "-", "-", str(r.port),
            f"[red]stop ({r.id})[/]",
        )  # fmt: skip
    return table


def _print_plan(plan, *, commands: bool = True) -> None:
    from rich.markup import escape

    console = stdout_console()
    console.print(_plan_table(plan))
    for e in plan.engines:
        for note in e.notes:
            console.print(f"[yellow]note[/] {escape(e.label)}: {escape(note)}")
    if not commands:
        return
    for e in plan.engines:
        if e.action == "keep":
            continue
        shown = e.to_dict()  # secrets masked
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(shown["env"].items()))
        console.print(f"\n[bold]{escape(e.label)}[/]", soft_wrap=True)
        if env:
            console.print(f"  env: {escape(env)}", soft_wrap=True)
        console.print(f"  {escape(shown['command_line'])}", soft_wrap=True)


def _engines_table(config):
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{config.name}: {config.description}", title_justify="left")
    for column in ("NAME", "KIND", "MODEL", "GPU", "PORT", "LABEL"):
        table.add_column(column, overflow="fold")
    for e in config.engines:
        replicas = f" x{e.replicas}" if e.replicas > 1 else ""
        table.add_row(
            escape(e.name) + replicas,
            e.kind,
            escape(e.model),
            "auto" if e.use_gpu is None else ("yes" if e.use_gpu else "no"),
            str(e.port or "auto"),
            escape(e.label or f"{config.name}-{e.name}"),
        )
    return table


class _LiveTable:
    """A live table (engine, status, elapsed, last log line) on stderr, fed from threads."""

    # Engine statuses as everywhere, plus the apply's own steps.
    COLORS = {**STATUS_COLORS, "kept": "green", "spawning": "cyan"}

    def __init__(self, plan):
        self.rows = {e.label: ["planned", 0.0, ""] for e in plan.engines}
        self.lock = threading.Lock()
        self.live = None
        self.plain = None

    def render(self):
        from rich.markup import escape
        from rich.table import Table

        table = Table(title_justify="left")
        widest = max((len(label) for label in self.rows), default=6)
        table.add_column("ENGINE", no_wrap=True, min_width=min(widest, 40))
        table.add_column("STATUS", no_wrap=True, min_width=8)
        table.add_column("ELAPSED", no_wrap=True, min_width=7, justify="right")
        table.add_column("LAST LOG LINE", no_wrap=True, overflow="ellipsis", ratio=1)
        with self.lock:
            for label, (status, elapsed, line) in self.rows.items():
                color = self.COLORS.get(status, "white")
                table.add_row(
                    escape(label), f"[{color}]{status}[/]", f"{elapsed:5.0f}s",
                    f"[dim]{escape(line)}[/]",
                )  # fmt: skip
        return table

    def update(self, event) -> None:
        with self.lock:
            if self.plain is not None:
                self.plain.report(event.label, event.status, event.elapsed, event.last_log_line)
            row = self.rows.setdefault(event.label, ["", 0.0, ""])
            row[0] = event.status
            if event.status not in (Status.STOPPED, "kept"):
                row[1] = event.elapsed
            if event.last_log_line:
                row[2] = event.last_log_line.strip()

    def __enter__(self):
        from rich.live import Live

        if not stderr_is_terminal():  # no redrawing in logs: plain lines, then the final table
            self.plain = PlainProgress()
            return self

        self.live = Live(
            get_renderable=self.render, console=stderr_console(), refresh_per_second=4,
            transient=False, redirect_stdout=False, redirect_stderr=False,
        )  # fmt: skip
        self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live is None:
            stderr_console().print(self.render())
            return
        self.live.__exit__(*exc)


# --------------------------------------------------------------------------- commands


@app.command("list")
def list_presets(json_out: bool = typer.Option(False, "--json")) -> None:
    """List the built-in presets (and applied ones from files): name, description, engines."""
    from sagellm_cli.core import presets
    from sagellm_cli.core.state import StateStore

    rows = presets.summaries(StateStore().read().presets)
    if json_out:
        emit_json([row.to_dict() for row in rows])
        return
    from rich.table import Table

    table = Table(title="presets", title_justify="left")
    for column in ("NAME", "ENGINES", "APPLIED", "DESCRIPTION"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row.name, str(row.engines), "yes" if row.applied else "-", row.description)
    stdout_console().print(table)


@app.command("show")
def show(
    preset: str | None = typer.Argument(None, help="A built-in preset name."),
    name: str | None = NAME_OPT,
    file: Path | None = FILE_OPT,
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Show a preset's engines and the plan `apply` would follow now."""
    from sagellm_cli.core.presets import make_plan

    loaded = _load(name, file, preset)
    plan, plan_error = None, None
    try:
        plan = make_plan(loaded, _manager())
    except SageError as exc:
        plan_error = exc
    if json_out:
        emit_json(
            {
                "name": loaded.name,
                "description": loaded.config.description,
                "file": str(loaded.path),
                "builtin": loaded.builtin,
                "engines": [e.model_dump() for e in loaded.config.engines],
                "plan": plan.to_dict() if plan else None,
                "plan_error": plan_error.to_dict() if plan_error else None,
            }
        )
        return
    stdout_console().print(_engines_table(loaded.config))
    if plan is not None:
        _print_plan(plan)
    else:
        info(f"plan: not possible now: {plan_error.one_line()}")


@app.command("validate")
def validate(
    preset: str | None = typer.Argument(None, help="A built-in preset name."),
    name: str | None = NAME_OPT,
    file: Path | None = FILE_OPT,
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Check a preset file against the schema; starts nothing."""
    from sagellm_cli.core.presets import PresetInvalid

    try:
        loaded = _load(name, file, preset)
    except PresetInvalid as exc:
        if json_out:
            emit_json({"valid": False, "problems": [p.to_dict() for p in exc.problems]})
        raise
    engines = sum(e.replicas for e in loaded.config.engines)
    if json_out:
        emit_json({"valid": True, "name": loaded.name, "file": str(loaded.path),
                   "engines": engines, "problems": []})  # fmt: skip
    else:
        info(f"{loaded.path}: preset {loaded.name!r} is valid ({engines} engine(s))")


@app.command("apply")
def apply(
    name: str | None = NAME_OPT,
    file: Path | None = FILE_OPT,
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Print the whole plan; start nothing (exit 4 if it can't be placed).",
    ),
    no_rollback: bool = typer.Option(
        False, "--no-rollback", help="On failure keep the engines that came up healthy."
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="Stop engines removed from the file."),
    timeout: float = typer.Option(600.0, help="Seconds each engine may take to become ready."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Bring a preset up: plan, start all engines at once, wait, roll back on failure."""
    from sagellm_cli.core.presets import apply_plan, make_plan
    from sagellm_cli.core.presets.apply import ApplyFailed

    loaded = _load(name, file)
    manager = _manager()
    plan = make_plan(loaded, manager)
    if dry_run:
        if json_out:
            emit_json({"dry_run": True, **plan.to_dict()})
        else:
            _print_plan(plan)
    if dry_run:
        # The whole plan is printed first; an engine this machine cannot place fails it
        # (exit 4 for no GPU or no room), a model still to prepare does not.
        plan.check_placeable()
        return
    plan.check_startable()
    confirm = yes
    if plan.remove and not yes and not json_out and sys.stdin.isatty():
        names = ", ".join(f"{r.label} ({r.id})" for r in plan.remove)
        if not typer.confirm(f"stop engines no longer in the preset: {names}?", err=True):
            raise OperationFailed("apply cancelled; nothing was changed")
        confirm = True
    try:
        if json_out or plan.noop:
            result = apply_plan(plan, manager, timeout=timeout, rollback=not no_rollback,
                                confirm_remove=confirm)  # fmt: skip
        else:
            with _LiveTable(plan) as live:
                result = apply_plan(plan, manager, timeout=timeout, rollback=not no_rollback,
                                    confirm_remove=confirm, on_event=live.update)  # fmt: skip
    except ApplyFailed as exc:
        if json_out:
            emit_json(exc.result.to_dict())
        raise
    if json_out:
        emit_json(result.to_dict())
        return
    if result.noop:
        info(f"preset {plan.preset!r} is already up ({len(result.kept)} engine(s)); nothing to do")
    else:
        info(
            f"preset {plan.preset!r} is up in {human_duration(result.elapsed)}: "
            f"started {len(result.started)}, kept {len(result.kept)}, "
            f"stopped {len(result.removed)}"
        )
    for record in result.kept + result.started:
        typer.echo(f"{record.label}\t{record.id}\t{record.url}/v1\t{record.served_model_name}")


@app.command("down")
def down(
    preset: str | None = typer.Argument(None, help="Preset name (as applied)."),
    file: Path | None = FILE_OPT,
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Stop every engine of a preset. A preset with nothing running is a no-op."""
    from sagellm_cli.core import presets

    if (preset is None) == (file is None):
        raise BadInput("give a preset name or --file (not both)", hint="sage llm preset down NAME")
    name = preset if preset is not None else presets.load(file=file).name
    stopped = presets.down(name, _manager())
    if json_out:
        emit_json({"preset": name, "stopped": [r.to_dict() for r in stopped]})
        return
    if not stopped:
        info(f"no engines of preset {name!r} are running")
    for record in stopped:
        info(f"engine {record.id} ({record.label}) {record.status}")
