"""A Ray cluster as `sage llm cluster status` and `sage llm gpu --cluster` show it.

Nodes and their resources come from Ray (`ray.nodes()`, free resources per node), GPUs
from a small task on each live node that reads NVML there, and our engines from the state
file (reconciled first, so the engines of a node that died show as `failed`).
"""

from __future__ import annotations

import os
from typing import Any

from sagellm_cli.core.errors import BadInput
from sagellm_cli.core.lifecycle import Status
from sagellm_cli.core.records import EngineRecord

# Engines shown per node: the live ones and those that failed (a lost node's, say).
SHOWN_STATUSES = (Status.FAILED,)
GPU_TASK_TIMEOUT_S = 30.0


def resolve_address(explicit: str | None, records: list[EngineRecord]) -> str:
    """`--cluster`, else SAGELLM_RAY_ADDRESS, else the one cluster our engines were put on."""
    from sagellm_cli.core.launchers.ray import RAY_ADDRESS_ENV, is_ray_node

    if explicit:
        return explicit
    if os.environ.get(RAY_ADDRESS_ENV):
        return os.environ[RAY_ADDRESS_ENV]
    recorded = {
        r.spec.cluster
        for r in records
        if is_ray_node(r.node) and r.spec is not None and r.spec.cluster and r.is_live
    }
    if len(recorded) == 1:
        return recorded.pop()
    raise BadInput(
        "which Ray cluster?" if recorded else "no Ray cluster given",
        hint="pass --cluster ray://HOST:PORT (or the head's HOST:PORT) or set SAGELLM_RAY_ADDRESS",
    )


def _records() -> list[EngineRecord]:
    from sagellm_cli.core.engines.manager import EngineManager

    return EngineManager().list(include_all=True)


def _resources(raw: dict[str, float]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "CPU": raw.get("CPU", 0.0),
        "GPU": raw.get("GPU", 0.0),
        "memory_gib": round(raw.get("memory", 0.0) / 1024**3, 2),
    }
    skip = {"CPU", "GPU", "memory", "object_store_memory"}
    other = {k: v for k, v in raw.items() if k not in skip and not k.startswith("node:")}
    if other:
        out["other"] = other
    return out


def _engine(record: EngineRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "label": record.label,
        "status": record.status,
        "kind": record.kind,
        "served_model_name": record.served_model_name,
        "url": record.url,
        "gpus": record.gpus,
        "error": record.error if record.status == Status.FAILED else None,
    }


def _available_per_node() -> dict[str, dict[str, float]]:
    try:  # not public API in Ray 2.60; the status still shows totals without it
        from ray._private.state import available_resources_per_node

        return available_resources_per_node()
    except Exception:  # noqa: BLE001
        return {}


def cluster_status(address: str | None = None) -> dict[str, Any]:
    """Every node of the cluster (dead ones included), its resources and our engines."""
    from sagellm_cli.core.launchers.ray import connect, is_ray_node, node_name

    records = _records()
    address = connect(resolve_address(address, records))
    import ray

    free = _available_per_node()
    shown = [
        r for r in records if is_ray_node(r.node) and (r.is_live or r.status in SHOWN_STATUSES)
    ]
    nodes = []
    known: set[str] = set()
    for raw in sorted(ray.nodes(), key=lambda n: (not n.get("Alive"), n["NodeID"])):
        name = node_name(raw["NodeID"])
        known.add(name)
        resources = raw.get("Resources") or {}
        nodes.append(
            {
                "node": name,
                "node_id": raw["NodeID"],
                "ip": raw.get("NodeManagerAddress"),
                "alive": bool(raw.get("Alive")),
                "head": "node:__internal_head__" in resources,
                "resources": _resources(resources),
                "available": _resources(free[raw["NodeID"]])
                if raw.get("Alive") and raw["NodeID"] in free
                else None,
                "engines": [_engine(r) for r in shown if r.node == name],
            }
        )
    return {
        "address": address,
        "nodes": nodes,
        "engines_on_unknown_nodes": [_engine(r) for r in shown if r.node not in known],
    }


def cluster_gpus(address: str | None = None) -> dict[str, Any]:
    """Each live node's GPUs, read by a small task on that node through NVML."""
    from sagellm_cli.core.launchers.ray import connect, is_ray_node, node_name

    records = _records()
    address = connect(resolve_address(address, records))
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from sagellm_cli.core.launchers.ray_actor import gpu_info

    alive = [n for n in ray.nodes() if n.get("Alive")]
    refs = [
        gpu_info.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote()
        for n in alive
    ]
    nodes = []
    for raw, ref in zip(alive, refs, strict=True):
        name = node_name(raw["NodeID"])
        try:
            info = ray.get(ref, timeout=GPU_TASK_TIMEOUT_S)
            inventory = info["inventory"]
        except Exception as exc:  # noqa: BLE001 - one node's failure is shown, not fatal
            ray.cancel(ref, force=True)
            inventory = {"nvml": False, "reason": f"{type(exc).__name__}: {exc}", "gpus": []}
        engines = [r for r in records if r.node == name and r.is_live and r.gpus]
        nodes.append(
            {
                "node": name,
                "node_id": raw["NodeID"],
                "ip": raw.get("NodeManagerAddress"),
                "ray_gpus": (raw.get("Resources") or {}).get("GPU", 0.0),
                "nvml": inventory.get("nvml", False),
                "reason": inventory.get("reason"),
                "gpus": inventory.get("gpus", []),
                "engines": [_engine(r) for r in engines if is_ray_node(r.node)],
            }
        )
    return {"address": address, "nodes": nodes}
