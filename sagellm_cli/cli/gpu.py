"""`sage llm gpu`: the GPU inventory with our reservations, and `gpu plan MODEL`."""

from __future__ import annotations

import time
from typing import Any

import typer
from typer.core import TyperGroup

from sagellm_cli.cli.common import emit_json, stdout_console
from sagellm_cli.core.errors import BadInput

DEFAULT_WATCH_SECONDS = 2.0


class _OptionalWatchValue(TyperGroup):
    """Let `--watch` take an optional value: `--watch` alone means every 2 seconds."""

    def parse_args(self, ctx, args):  # type: ignore[override]
        args = list(args)
        for i, arg in enumerate(args):
            if arg == "--":
                break
            if arg == "--watch":
                following = args[i + 1] if i + 1 < len(args) else None
                try:
                    float(following)  # type: ignore[arg-type]
                except (TypeError, ValueError):
                    args.insert(i + 1, str(DEFAULT_WATCH_SECONDS))
                break
        return super().parse_args(ctx, args)


app = typer.Typer(
    help="GPU inventory (NVML), reservations by our engines, and placement plans.",
    invoke_without_command=True,
    cls=_OptionalWatchValue,
)


def _read_state():
    from sagellm_cli.core.engines.manager import EngineManager

    # Reconciled, so a dead engine's reservation is not shown as held; nothing is written.
    return EngineManager().snapshot()


@app.callback()
def gpu(
    ctx: typer.Context,
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    watch: float | None = typer.Option(
        None,
        "--watch",
        metavar="[SECONDS]",
        help=f"Refresh every SECONDS (default {DEFAULT_WATCH_SECONDS:g}) until Ctrl-C.",
    ),
    cluster: str | None = typer.Option(
        None, "--cluster", help="Every node of this Ray cluster instead (docs/cluster.md)."
    ),
) -> None:
    """Show GPUs: memory, our reservations, utilisation, processes mapped to engines."""
    if ctx.invoked_subcommand is not None:
        return
    if cluster is not None:
        from sagellm_cli.cli.cluster import show_gpus

        show_gpus(cluster, json_out)
        return
    if watch is not None and watch <= 0:
        raise BadInput("--watch needs a positive number of seconds")
    if watch is None:
        _show_once(json_out)
    else:
        _watch(json_out, watch)


def _snapshot():
    from sagellm_cli.core.gpu import gpu_snapshot

    return gpu_snapshot(_read_state())


def _show_once(json_out: bool) -> None:
    snap = _snapshot()
    if json_out:
        emit_json(snap.to_dict())
        return
    console = stdout_console()
    for part in _render(snap):
        console.print(part)


def _watch(json_out: bool, seconds: float) -> None:
    import json

    try:
        if json_out:
            while True:
                typer.echo(json.dumps(_snapshot().to_dict(), default=str))
                time.sleep(seconds)
        from rich.console import Group
        from rich.live import Live

        console = stdout_console()
        with Live(console=console, auto_refresh=False, screen=False) as live:
            while True:
                parts = _render(_snapshot())
                stamp = time.strftime("%H:%M:%S")
                footer = f"[dim]every {seconds:g}s · {stamp} · Ctrl-C to stop[/]"
                live.update(Group(*parts, footer), refresh=True)
                time.sleep(seconds)
    except KeyboardInterrupt:
        return


# --------------------------------------------------------------------------- rendering


def _gib(mib: float | None) -> str:
    return "-" if mib is None else f"{mib / 1024:.1f}"


def _opt(value: Any, unit: str = "") -> str:
    return "-" if value is None else f"{value}{unit}"


def _render(snap) -> list[Any]:
    """Rich renderables for one snapshot (pure: no I/O)."""
    from rich.table import Table

    inv = snap.inventory
    if not inv.gpus and not inv.mock:
        return [f"no NVML: {inv.reason or 'no GPUs found'}"]
    mock = " [bold yellow](mock)[/]" if inv.mock else ""
    n = len(inv.gpus)
    head = (
        f"[bold]{n} GPU{'s' if n != 1 else ''}[/]{mock} · driver {inv.driver_version or '-'}"
        f" · CUDA {inv.cuda_version or '-'}"
    )
    if inv.mock:
        head += " · from SAGELLM_MOCK_GPUS"
    parts: list[Any] = [head]
    caps = {c.index: c for c in snap.capacities}

    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("GPU", "Name", "Used GiB", "Total", "Reserved", "Free*", "Util", "Temp", "Power"):
        table.add_column(col, justify="left" if col in ("GPU", "Name") else "right")
    table.add_column("NVLink", justify="right")
    for g in inv.gpus:
        cap = caps.get(g.index)
        label = f"{g.index}" + (" (mock)" if g.mock else "")
        if g.error:
            table.add_row(label, f"[red]unavailable: {g.error}[/]", *["-"] * 8)
            continue
        power = "-"
        if g.power_w is not None:
            power = f"{g.power_w:.0f}W" + (f"/{g.power_limit_w:.0f}W" if g.power_limit_w else "")
        links = g.nvlink_active_links
        table.add_row(
            label,
            g.name,
            _gib(g.memory_used_mib),
            _gib(g.memory_total_mib),
            f"{cap.reserved_gib:.1f}" if cap else "-",
            f"{cap.free_gib:.1f}" if cap else "-",
            _opt(g.utilization_gpu_pct, "%"),
            _opt(g.temperature_c, "C"),
            power,
            "-" if not links else str(links),
        )
    parts.append(table)
    parts.append(
        "[dim]* free for planning = total - memory used outside our reservations - "
        f"our reservations; a start also needs {snap_headroom()} GiB headroom[/]"
    )

    procs = [(g.index, p) for g in inv.gpus for p in g.processes]
    if procs:
        pt = Table(title="GPU processes", title_justify="left", box=None, header_style="bold")
        for col in ("GPU", "PID", "Process", "Memory GiB", "Engine"):
            pt.add_column(col, justify="right" if col in ("PID", "Memory GiB") else "left")
        for index, p in procs:
            pt.add_row(str(index), str(p.pid), p.name or "-", _gib(p.used_mib), p.engine_id or "-")
        parts.append(pt)

    if snap.reservations:
        rt = Table(title="Reservations", title_justify="left", box=None, header_style="bold")
        for col in ("Engine", "Model", "Status", "GPUs", "Reserved GiB/GPU", "Used GiB (NVML)"):
            rt.add_column(col, justify="right" if "GiB" in col else "left")
        for r in snap.reservations:
            eng = snap.engines.get(r.engine_id, {})
            gpus = ",".join(str(i) for i in r.gpus) + (" (mock)" if r.mock else "")
            usage = snap.usage(r)
            used = " / ".join("-" if u is None else f"{u:.2f}" for u in usage["used_gib"])
            if usage["over"]:
                used = f"[bold red]{used} OVER[/]"
            rt.add_row(
                r.engine_id,
                eng.get("model", "-"),
                eng.get("status", "-"),
                gpus,
                f"{r.gib_per_gpu:.2f}",
                used,
            )
        parts.append(rt)

    if n > 1 and inv.topology:
        tt = Table(title="Topology", title_justify="left", box=None, header_style="bold")
        tt.add_column("")
        for g in inv.gpus:
            tt.add_column(f"GPU{g.index}", justify="center")
        for g, row in zip(inv.gpus, inv.topology, strict=False):
            tt.add_row(f"GPU{g.index}", *row)
        parts.append(tt)
        parts.append(
            "[dim]NV# = NVLink (links), PIX/PXB = PCIe switch, PHB = host bridge, "
            "NODE = same NUMA node, SYS = across NUMA nodes[/]"
        )
    return parts


def snap_headroom() -> str:
    from sagellm_cli.core.gpu import HEADROOM_GIB

    return f"{HEADROOM_GIB:g}"


# --------------------------------------------------------------------------- plan


@app.command("plan")
def plan(
    model: str = typer.Argument(..., help="Model path, Hugging Face id, or name with a size."),
    gpus: int | None = typer.Option(
        None, "--gpus", min=1, help="Plan for this many GPUs (TP up to 8, PP beyond)."
    ),
    tp: int | None = typer.Option(
        None, "--tp", "--tensor-parallel", min=1, help="Check this tensor-parallel size."
    ),
    pp: int | None = typer.Option(
        None, "--pp", "--pipeline-parallel", min=1, help="Check this pipeline-parallel size."
    ),
    max_model_len: int | None = typer.Option(
        None, "--max-model-len", min=1, help="Context length the KV budget must hold."
    ),
    engine_kind: str = typer.Option("llm", "--engine-kind", "-k", help="llm or embedding."),
    gpu_memory_gb: float | None = typer.Option(None, help="Use this GiB per GPU instead."),
    kv_cache_gb: float | None = typer.Option(None, help="KV-cache budget per GPU in GiB."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Estimate GPU memory for MODEL and recommend TP/PP, checked against the GPUs present."""
    from sagellm_cli.core.gpu import plan_model

    if engine_kind not in ("llm", "embedding"):
        raise BadInput(f"unknown engine kind {engine_kind!r}", hint="use llm or embedding")
    if gpus is not None and (tp or pp):
        raise BadInput("use either --gpus or --tp/--pp, not both")
    result = plan_model(
        model,
        _read_state(),
        kind=engine_kind,
        gpu_count=gpus,
        tensor_parallel=tp,
        pipeline_parallel=pp,
        max_model_len=max_model_len,
        gpu_memory_gb=gpu_memory_gb,
        kv_cache_gb=kv_cache_gb,
    )
    if json_out:
        emit_json(result.to_dict())
        return
    console = stdout_console()
    for part in _render_plan(result):
        console.print(part)


def _render_plan(result) -> list[Any]:
    from rich.table import Table

    parts: list[Any] = []
    params = f"{result.params / 1e9:.2f}B" if result.params else "-"
    parts.append(
        f"[bold]{result.model}[/] ({result.kind}) · {params} parameters "
        f"(from {result.params_source})" + (f" · table: {result.tier}" if result.tier else "")
    )
    if result.mock:
        parts.append("[yellow]checked against mock GPUs (SAGELLM_MOCK_GPUS)[/]")
    elif not result.gpu_count:
        parts.append(f"no GPUs to check against: {result.reason or 'none found'}")
    else:
        parts.append(
            f"checked against {result.gpu_count} GPU{'s' if result.gpu_count != 1 else ''}"
        )
    table = Table(box=None, header_style="bold")
    for col in (
        "TP",
        "PP",
        "GiB/GPU",
        "weights",
        "KV",
        "overhead",
        "dtype",
        "fits",
        "GPUs / problem",
    ):
        table.add_column(col, justify="left" if col in ("dtype", "GPUs / problem") else "right")
    for lay in result.layouts:
        est = lay.estimate
        if lay.fits_now:
            fits = "[green]yes[/]"
        elif lay.fits_hardware:
            fits = "[yellow]not now[/]"
        else:
            fits = "[red]no[/]"
        where = ",".join(map(str, lay.gpus)) if lay.gpus else (lay.problem or "-")
        marker = "" if lay.in_table else " [dim](alt)[/]"
        table.add_row(
            f"{lay.tensor_parallel}{marker}",
            str(lay.pipeline_parallel),
            f"{est.gib_per_gpu:.1f}",
            f"{est.weights_gib_per_gpu:.1f}",
            f"{est.kv_gib_per_gpu:.1f}",
            f"{est.overhead_gib_per_gpu:.1f}",
            est.dtype,
            fits,
            where,
        )
    parts.append(table)
    chosen = result.chosen
    if chosen is not None:
        verdict = (
            "fits now"
            if chosen.fits_now
            else (
                "fits these GPUs once others free memory"
                if chosen.fits_hardware
                else "does not fit"
            )
        )
        parts.append(
            f"recommended: TP {chosen.tensor_parallel} x PP {chosen.pipeline_parallel}, "
            f"{chosen.estimate.gib_per_gpu:.1f} GiB per GPU ({verdict})"
        )
        if chosen.fits_now:
            flags = f"--tensor-parallel {chosen.tensor_parallel}"
            if chosen.pipeline_parallel > 1:
                flags += f" --pipeline-parallel {chosen.pipeline_parallel}"
            parts.append(f"[dim]sage llm engine start {result.model} {flags}[/]")
    notes = sorted({n for lay in result.layouts for n in lay.estimate.notes})
    if notes:
        parts.append("[dim]" + "; ".join(notes) + "[/]")
    return parts
