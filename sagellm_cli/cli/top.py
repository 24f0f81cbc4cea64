"""`sage llm top`: engines, GPUs and the gateway's live figures, refreshed every second.

The data is `core.engines.monitor.top_document` (engines, GPUs, and the gateway's
`/v1/management/metrics`); this module only parses options and renders it.
"""

from __future__ import annotations

import json
import time
from typing import Any

import typer

from sagellm_cli.cli.common import check_timeout, human_duration, status_color, stdout_console
from sagellm_cli.core.errors import BadInput
from sagellm_cli.core.lifecycle import LIVE


def register(parent: typer.Typer) -> None:
    """Attach `top` to the `llm` group."""
    parent.command("top")(top)


def top(
    json_out: bool = typer.Option(
        False, "--json", help="Print one JSON document per interval (one line each)."
    ),
    interval: float = typer.Option(1.0, "--interval", "-i", help="Seconds between refreshes."),
    count: int | None = typer.Option(
        None, "--count", "-n", min=1, help="Stop after N refreshes (default: until Ctrl-C)."
    ),
    window: float = typer.Option(60.0, "--window", help="Seconds the gateway figures cover."),
    url: str | None = typer.Option(
        None, "--url", help="The gateway to read (default: the one recorded in the state file)."
    ),
) -> None:
    """Live view of engines, GPUs and the gateway's per-model and per-engine figures."""
    from sagellm_cli.core.engines.manager import EngineManager
    from sagellm_cli.core.engines.monitor import top_document

    check_timeout(interval, "--interval")
    if interval == 0:
        raise BadInput("--interval must be above 0 seconds", hint="e.g. --interval 1")
    if not 0 < window <= 600:
        raise BadInput(f"--window must be in (0, 600] seconds, not {window:g}")
    manager = EngineManager()

    def snapshot() -> dict[str, Any]:
        return top_document(manager, url=url, window=window)

    try:
        if json_out:
            for n in range(count or 1 << 62):
                if n:
                    time.sleep(interval)
                typer.echo(json.dumps(snapshot(), default=str))
            return
        _live(snapshot, interval, count)
    except KeyboardInterrupt:
        return


def _live(snapshot, interval: float, count: int | None) -> None:
    from rich.console import Group
    from rich.live import Live

    console = stdout_console()
    with Live(console=console, auto_refresh=False, screen=False) as live:
        n = 0
        while True:
            live.update(Group(*render(snapshot(), interval)), refresh=True)
            n += 1
            if count is not None and n >= count:
                return
            time.sleep(interval)


# --------------------------------------------------------------------------- rendering


def _ms(value: float | None) -> str:
    return "-" if value is None else (f"{value:.0f}" if value >= 10 else f"{value:.1f}")


def _rate(value: float | None) -> str:
    return "-" if not value else f"{value:.2f}" if value < 10 else f"{value:.0f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def render(doc: dict[str, Any], interval: float = 1.0) -> list[Any]:
    """Rich renderables for one top document (pure: no I/O)."""
    from rich.markup import escape
    from rich.table import Table

    metrics = doc.get("metrics") or {}
    gateway = doc.get("gateway")
    stamp = time.strftime("%H:%M:%S", time.localtime(doc.get("at", time.time())))
    if gateway is None:
        head = "[dim]no gateway running (`sage llm serve --background`)[/]"
    elif doc.get("metrics_error"):
        head = f"gateway {escape(gateway['url'])} · [red]{escape(doc['metrics_error'])}[/]"
    else:
        total = metrics.get("total", {})
        sched = metrics.get("scheduling", {})
        head = (
            f"gateway [bold]{escape(gateway['url'])}[/] · last {metrics.get('window_s', 60):g}s:"
            f" {total.get('completed', 0)} done, {total.get('failed', 0)} failed,"
            f" {total.get('inflight', 0)} in flight, {total.get('queue_depth', 0)} queued"
            f" · scheduling {sched.get('active_policy') or sched.get('policy', 'none')}"
        )
    parts: list[Any] = [f"{head}  [dim]{stamp} · every {interval:g}s · Ctrl-C to stop[/]"]

    models = metrics.get("models") or {}
    if models:
        table = Table(title="models", title_justify="left", box=None, header_style="bold")
        for col in ("MODEL", "ENGINES", "INFL", "QUEUE", "DONE", "FAIL", "REQ/S", "TOK/S",
                    "E2E P50", "P95", "P99", "TTFT P50", "P95", "SLO"):  # fmt: skip
            table.add_column(col, justify="left" if col == "MODEL" else "right")
        for name, m in models.items():
            lat, ttft = m.get("latency_ms", {}), m.get("ttft_ms", {})
            table.add_row(
                escape(name), f"{m.get('healthy_engines', 0)}/{m.get('engines', 0)}",
                str(m.get("inflight", 0)), str(m.get("queue_depth", 0)),
                str(m.get("completed", 0)), str(m.get("failed", 0)),
                _rate(m.get("requests_per_s")), _rate(m.get("output_tokens_per_s")),
                _ms(lat.get("p50")), _ms(lat.get("p95")), _ms(lat.get("p99")),
                _ms(ttft.get("p50")), _ms(ttft.get("p95")),
                _pct((m.get("slo") or {}).get("compliance")),
            )  # fmt: skip
        parts.append(table)

    per_engine = metrics.get("engines") or {}
    table = Table(title="engines", title_justify="left", box=None, header_style="bold")
    for col in ("ID", "LABEL", "MODEL", "STATUS", "GPUS", "UP", "INFL", "DONE", "FAIL",
                "REQ/S", "TOK/S", "E2E P95", "TTFT P95"):  # fmt: skip
        table.add_column(
            col, justify="left" if col in ("ID", "LABEL", "MODEL", "STATUS") else "right"
        )
    for r in doc.get("engines", []):
        m = per_engine.get(r["id"], {})
        color = status_color(r["status"])
        live = r.get("status") in LIVE
        table.add_row(
            r["id"], escape(r.get("label") or "-"), escape(r["served_model_name"]),
            f"[{color}]{r['status']}[/]", ",".join(map(str, r.get("gpus") or [])) or "cpu",
            human_duration(time.time() - r["started_at"]) if live and r.get("started_at") else "-",
            str(m.get("inflight", "-")), str(m.get("completed", "-")), str(m.get("failed", "-")),
            _rate(m.get("requests_per_s")), _rate(m.get("output_tokens_per_s")),
            _ms((m.get("latency_ms") or {}).get("p95")), _ms((m.get("ttft_ms") or {}).get("p95")),
        )  # fmt: skip
    parts.append(table if doc.get("engines") else "[dim]no engines running[/]")

    gpus = doc.get("gpus") or {}
    if gpus.get("gpus"):
        gt = Table(title="GPUs", title_justify="left", box=None, header_style="bold")
        for col in ("GPU", "NAME", "USED GIB", "TOTAL", "RESERVED", "UTIL"):
            gt.add_column(col, justify="left" if col in ("GPU", "NAME") else "right")
        for g in gpus["gpus"]:
            util = g.get("utilization_gpu_pct")
            gt.add_row(
                str(g["index"]), escape(g.get("name", "-")),
                f"{g.get('memory_used_mib', 0) / 1024:.1f}",
                f"{g.get('memory_total_mib', 0) / 1024:.1f}",
                f"{g.get('sagellm_reserved_gib', 0):.1f}", "-" if util is None else f"{util}%",
            )  # fmt: skip
        parts.append(gt)
    else:
        parts.append(f"[dim]GPUs: {escape(gpus.get('reason') or 'none')}[/]")
    return parts
