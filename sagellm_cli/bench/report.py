"""Show a run: rich tables, the `--json` file, and the `--plot` PNG.

Everything here works on the result's dict form, so a saved JSON renders the
same as a fresh run. rich and matplotlib are imported only when used.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from sagellm_cli.bench.metrics import RequestRecord, throughput_timeline
from sagellm_cli.core.errors import BadInput, OperationFailed

LATENCY_METRICS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E"))


def fmt(value: float | int | None, digits: int = 1) -> str:
    """A number for a table cell; `-` for none."""
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:,.{digits}f}"


def _groups(summary: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    classes = summary.get("classes") or {}
    groups = [("all", summary["all"])]
    # A run without a mix has the single class "default": the "all" row says it all.
    if len(classes) > 1 or (classes and next(iter(classes)) != "default"):
        groups += list(classes.items())
    return groups


def render_summary(result: dict[str, Any], console) -> None:
    """Print the throughput and latency tables of a result dict to a rich console."""
    from rich.table import Table

    cfg = result.get("config", {})
    summary = result["summary"]
    load = (
        f"concurrency {cfg.get('concurrency')}"
        if cfg.get("mode") == "closed"
        else f"rate {cfg.get('request_rate')}/s burstiness {cfg.get('burstiness')}"
        + (f" cap {cfg['concurrency']}" if cfg.get("concurrency") else "")
    )
    title = f"{cfg.get('model', '?')} ({cfg.get('endpoint', '?')}): {load}"
    caption = f"{cfg.get('url', '?')}, {fmt(summary['all'].get('duration_s'), 2)} s measured"
    tput = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for col in ("class", "requests", "ok", "errors", "req/s", "out tok/s", "goodput/s", "SLO met"):
        tput.add_column(col, justify="left" if col == "class" else "right")
    for name, g in _groups(summary):
        attainment = g.get("slo_attainment")
        tput.add_row(
            name,
            fmt(g["requests"]),
            fmt(g["ok"]),
            fmt(g["errors"]),
            fmt(g["request_throughput"], 2),
            fmt(g["output_throughput"], 1),
            fmt(g.get("goodput"), 2),
            "-" if attainment is None else f"{attainment:.1%}",
        )
    console.print(tput)

    lat = Table(title="latency (ms)", title_justify="left")
    for col in ("class", "metric", "mean", "p50", "p90", "p99", "n"):
        lat.add_column(col, justify="left" if col in ("class", "metric") else "right")
    for name, g in _groups(summary):
        for key, label in LATENCY_METRICS:
            d = g.get(key) or {}
            if not d.get("count"):
                continue
            lat.add_row(
                name, label, fmt(d["mean"]), fmt(d["p50"]), fmt(d["p90"]), fmt(d["p99"]),
                fmt(d["count"]),
            )  # fmt: skip
    if lat.row_count:
        console.print(lat)
    errors = summary["all"].get("error_kinds") or {}
    for message, count in errors.items():
        console.print(f"[red]{count} x[/] {message}", markup=True, highlight=False)


def write_json(result: dict[str, Any], path: str) -> None:
    """Write the result to `path` (`-` for stdout)."""
    text = json.dumps(result, indent=1, default=str)
    if path == "-":
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        return
    target = Path(path).expanduser()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text + "\n", encoding="utf-8")
    except OSError as exc:
        raise OperationFailed(
            f"can't write {target}: {exc.strerror}", hint="pick a writable --json path"
        ) from None


def check_writable(path: str, option: str) -> None:
    """BadInput now, before a long run, if `path` can't be written later."""
    if path == "-":
        return
    target = Path(path).expanduser()
    if target.is_dir():
        raise BadInput(f"{option} {path!r} is a directory", hint=f"give {option} a file name")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # missing directories are created when writing
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise BadInput(f"{option} {path!r} is not writable", hint=f"pick another {option} path")


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise BadInput(
            "--plot needs matplotlib, which is not installed",
            hint="pip install matplotlib (or pip install 'sagellm-cli[plot]')",
        ) from None
    matplotlib.use("Agg")  # no display here; a PNG is all we write
    import matplotlib.pyplot as plt

    return plt


def _cdf(values: list[float]) -> tuple[list[float], list[float]]:
    xs = sorted(values)
    return xs, [(i + 1) / len(xs) for i in range(len(xs))]


def check_plot_available() -> None:
    """BadInput now, before a long run, if matplotlib is missing."""
    _matplotlib()


def plot(result: dict[str, Any], path: str) -> None:
    """A PNG with the latency CDFs (TTFT, E2E; per class) and throughput over time."""
    plt = _matplotlib()
    records = [RequestRecord.from_dict(r) for r in result.get("records", [])]
    measured = [r for r in records if r.ok and not r.warmup]
    classes = sorted({r.cls for r in measured})
    fig, (ax_cdf, ax_tp) = plt.subplots(1, 2, figsize=(13, 4.8))

    groups = [("all", measured)]
    if len(classes) > 1:
        groups += [(c, [r for r in measured if r.cls == c]) for c in classes]
    # One colour per class, one line style per metric.
    for color, (name, recs) in enumerate(groups):
        for metric, attr, style in (("TTFT", "ttft_s", "-"), ("E2E", "e2e_s", "--")):
            values = [getattr(r, attr) * 1000 for r in recs if getattr(r, attr) is not None]
            if values:
                xs, ys = _cdf(values)
                ax_cdf.step(
                    xs, ys, style, where="post", color=f"C{color}", label=f"{metric} {name}"
                )
    ax_cdf.set_xlabel("latency (ms)")
    ax_cdf.set_ylabel("fraction of requests")
    ax_cdf.set_title("latency CDF")
    ax_cdf.grid(alpha=0.3)
    if ax_cdf.lines:
        ax_cdf.legend(fontsize=8)

    duration = result.get("summary", {}).get("all", {}).get("duration_s") or 1.0
    bin_s = max(0.1, round(duration / 60, 1))
    starts, tokens, done = throughput_timeline(records, bin_s)
    ax_tp.step(starts, tokens, where="post", color="tab:blue", label="output tok/s")
    ax_tp.set_xlabel("time since start (s)")
    ax_tp.set_ylabel("output tokens/s", color="tab:blue")
    ax_rq = ax_tp.twinx()
    ax_rq.step(starts, done, where="post", color="tab:orange", label="completed req/s")
    ax_rq.set_ylabel("completed requests/s", color="tab:orange")
    ax_tp.set_title(f"throughput over time ({bin_s:g} s bins)")
    ax_tp.grid(alpha=0.3)

    cfg = result.get("config", {})
    fig.suptitle(f"sage llm bench: {cfg.get('endpoint', '')} {cfg.get('model', '')}", fontsize=10)
    fig.tight_layout()
    target = Path(path).expanduser()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(target, dpi=110)
    except OSError as exc:
        raise OperationFailed(
            f"can't write {target}: {exc.strerror}", hint="pick a writable --plot path"
        ) from None
    finally:
        plt.close(fig)
