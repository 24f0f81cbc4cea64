"""`sage llm cluster status`: a Ray cluster's nodes, resources and our engines on each.

Also renders `sage llm gpu --cluster` (every node's GPUs, read through NVML on the node).
See docs/cluster.md.
"""

from __future__ import annotations

from typing import Any

import typer

from sagellm_cli.cli.common import emit_json, stdout_console

app = typer.Typer(
    help="Engines on a Ray cluster: its nodes, resources and our engines (docs/cluster.md).",
    no_args_is_help=True,
)

CLUSTER_HELP = "ray://HOST:PORT or the head's HOST:PORT (default: $SAGELLM_RAY_ADDRESS)."


@app.callback()
def _group() -> None:
    """Engines on a Ray cluster: its nodes, resources and our engines (docs/cluster.md)."""


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:g}"


def _free_of(node: dict[str, Any], key: str) -> str:
    total = node["resources"].get(key, 0.0)
    free = node["available"].get(key) if node.get("available") else None
    return f"{_num(free)}/{_num(total)}"


@app.command("status")
def status(
    cluster: str | None = typer.Option(None, "--cluster", help=CLUSTER_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Nodes (alive or lost), free/total CPUs and GPUs, and our engines on each node."""
    from sagellm_cli.core.launchers.ray_cluster import cluster_status

    data = cluster_status(cluster)
    if json_out:
        emit_json(data)
        return
    from rich.markup import escape
    from rich.table import Table

    console = stdout_console()
    alive = sum(1 for n in data["nodes"] if n["alive"])
    console.print(f"[bold]Ray cluster[/] {escape(data['address'])}: {alive} node(s) alive")
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("Node", "IP", "State", "CPU free/total", "GPU free/total", "Memory GiB", "Engines"):
        table.add_column(col)
    for node in data["nodes"]:
        engines = ", ".join(
            f"{escape(e['label'] or e['id'])} ({e['status']})" for e in node["engines"]
        )
        state = "alive" if node["alive"] else "[red]dead[/]"
        if node["head"]:
            state += " (head)"
        table.add_row(
            node["node"],
            node["ip"] or "-",
            state,
            _free_of(node, "CPU"),
            _free_of(node, "GPU"),
            _num(node["resources"].get("memory_gib")),
            engines or "-",
        )
    console.print(table)
    if data["engines_on_unknown_nodes"]:
        lost = ", ".join(e["label"] or e["id"] for e in data["engines_on_unknown_nodes"])
        console.print(f"[yellow]engines on nodes the cluster does not know:[/] {escape(lost)}")


def show_gpus(cluster: str | None, json_out: bool) -> None:
    """`sage llm gpu --cluster`: each live node's GPUs (NVML read on that node)."""
    from sagellm_cli.core.launchers.ray_cluster import cluster_gpus

    data = cluster_gpus(cluster)
    if json_out:
        emit_json(data)
        return
    from rich.markup import escape
    from rich.table import Table

    console = stdout_console()
    console.print(f"[bold]Ray cluster[/] {escape(data['address'])}")
    for node in data["nodes"]:
        head = f"[bold]{node['node']}[/] {node['ip'] or '-'} · Ray GPUs {_num(node['ray_gpus'])}"
        if not node["gpus"]:
            console.print(f"{head} · no GPUs ({escape(node['reason'] or 'none found')})")
            continue
        console.print(head)
        table = Table(box=None, pad_edge=False, header_style="bold")
        for col in ("GPU", "Name", "Used GiB", "Total GiB", "Util"):
            table.add_column(col)
        for gpu in node["gpus"]:
            table.add_row(
                str(gpu["index"]),
                escape(gpu["name"]),
                f"{gpu['memory_used_mib'] / 1024:.1f}",
                f"{gpu['memory_total_mib'] / 1024:.1f}",
                "-" if gpu.get("utilization_gpu_pct") is None else f"{gpu['utilization_gpu_pct']}%",
            )
        console.print(table)
        for engine in node["engines"]:
            gpus = ",".join(str(g) for g in engine["gpus"])
            console.print(f"  engine {engine['label'] or engine['id']} on GPU {gpus}")
