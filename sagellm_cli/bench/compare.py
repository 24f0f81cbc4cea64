"""`sage llm bench compare A.json B.json ...`: the key numbers side by side, with ratios vs A."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sagellm_cli.bench.report import fmt
from sagellm_cli.core.errors import BadInput

# (label, path into a group summary, higher is better)
METRICS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("requests", ("requests",), True),
    ("errors", ("errors",), False),
    ("req/s", ("request_throughput",), True),
    ("output tok/s", ("output_throughput",), True),
    ("goodput req/s", ("goodput",), True),
    ("SLO attainment", ("slo_attainment",), True),
    ("TTFT mean ms", ("ttft_ms", "mean"), False),
    ("TTFT p50 ms", ("ttft_ms", "p50"), False),
    ("TTFT p90 ms", ("ttft_ms", "p90"), False),
    ("TTFT p99 ms", ("ttft_ms", "p99"), False),
    ("TPOT p50 ms", ("tpot_ms", "p50"), False),
    ("TPOT p99 ms", ("tpot_ms", "p99"), False),
    ("ITL p50 ms", ("itl_ms", "p50"), False),
    ("ITL p99 ms", ("itl_ms", "p99"), False),
    ("E2E mean ms", ("e2e_ms", "mean"), False),
    ("E2E p50 ms", ("e2e_ms", "p50"), False),
    ("E2E p90 ms", ("e2e_ms", "p90"), False),
    ("E2E p99 ms", ("e2e_ms", "p99"), False),
)


@dataclass
class CompareRow:
    """One metric across the runs; `ratios` are value / first value."""

    metric: str
    values: list[float | int | None]
    ratios: list[float | None]
    higher_is_better: bool


def load_result(path: str | Path) -> dict[str, Any]:
    """A `--json` result file; BadInput when it is missing or not one."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise BadInput(
            f"{str(path)!r} is not a file", hint="pass files written by bench run --json"
        )
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise BadInput(
            f"{file} is not JSON", hint="pass files written by bench run --json"
        ) from None
    if not isinstance(data, dict) or "all" not in (data.get("summary") or {}):
        raise BadInput(
            f"{file} is not a bench result", hint="pass files written by bench run --json"
        )
    return data


def labels_for(paths: list[str]) -> list[str]:
    """Short column names: file stems, made unique."""
    labels: list[str] = []
    for p in paths:
        stem = Path(p).stem or str(p)
        label, n = stem, 2
        while label in labels:
            label, n = f"{stem}#{n}", n + 1
        labels.append(label)
    return labels


def _dig(group: dict[str, Any] | None, path: tuple[str, ...]) -> Any:
    value: Any = group
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def compare(results: list[dict[str, Any]], cls: str = "all") -> list[CompareRow]:
    """Rows of the comparison for class `cls` (`all` = every request)."""
    groups = []
    for r in results:
        summary = r["summary"]
        groups.append(summary["all"] if cls == "all" else (summary.get("classes") or {}).get(cls))
    if all(g is None for g in groups):
        raise BadInput(f"no run has requests of class {cls!r}", hint="check --class")
    rows = []
    for label, path, higher in METRICS:
        values = [_dig(g, path) for g in groups]
        if all(v is None for v in values):
            continue
        base = values[0]
        ratios = [
            (v / base)
            if isinstance(v, int | float) and isinstance(base, int | float) and base
            else None
            for v in values
        ]
        rows.append(CompareRow(label, values, ratios, higher))
    return rows


def to_dict(labels: list[str], rows: list[CompareRow], cls: str) -> dict[str, Any]:
    """JSON form of a comparison."""
    return {
        "class": cls,
        "runs": labels,
        "rows": [
            {
                "metric": r.metric,
                "values": r.values,
                "ratios": r.ratios,
                "higher_is_better": r.higher_is_better,
            }
            for r in rows
        ],
    }


def render(labels: list[str], rows: list[CompareRow], cls: str, console) -> None:
    """A rich table: a column per run, `value (ratio x)` after the first; green when better."""
    from rich.table import Table

    table = Table(title=f"class: {cls} (ratios vs {labels[0]})", title_justify="left")
    table.add_column("metric")
    for label in labels:
        table.add_column(label, justify="right")
    for row in rows:
        digits = 3 if row.metric == "SLO attainment" else 2 if "/s" in row.metric else 1
        cells = [fmt(row.values[0], digits)]
        for value, ratio in zip(row.values[1:], row.ratios[1:], strict=True):
            cell = fmt(value, digits)
            if ratio is not None:
                better = ratio > 1 if row.higher_is_better else ratio < 1
                color = (
                    "green"
                    if better and abs(ratio - 1) > 0.02
                    else ("red" if not better and abs(ratio - 1) > 0.02 else "dim")
                )
                cell += f" [{color}]({ratio:.2f}x)[/]"
            cells.append(cell)
        table.add_row(row.metric, *cells)
    console.print(table)
