"""Placement for engine starts (`plan_gpu`), the inventory view with the ledger, and
`sage llm gpu plan`'s model plan. Called under the state lock for starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sagellm_cli.core.errors import BadInput, ResourceUnavailable, SageError
from sagellm_cli.core.gpu import placement as algo
from sagellm_cli.core.gpu.estimate import (
    MemoryEstimate,
    estimate_for_spec,
    estimate_memory,
    layout_for_gpu_count,
    read_weights,
    recommend_layouts,
)
from sagellm_cli.core.gpu.inventory import Inventory, engine_pid_map, read_inventory
from sagellm_cli.core.gpu.kv_budget import (
    CONCURRENT,
    KvBudget,
    context_gib,
    derive_kv_budget,
    start_mode,
)
from sagellm_cli.core.records import EngineSpec, GpuReservation, resolve_runtime
from sagellm_cli.core.state import State


@dataclass
class Placement:
    """Where an engine runs: NVML indices, and the GiB reserved on each of them."""

    gpus: list[int]
    uuids: list[str]
    gib_per_gpu: float
    total_gib: list[float]
    mock: bool = False
    estimate: MemoryEstimate | None = None
    # The KV cache handed to vLLM (`--kv-cache-memory-bytes`), or why vLLM profiles instead.
    kv_budget: KvBudget | None = None

    @property
    def kv_cache_bytes(self) -> int | None:
        """`--kv-cache-memory-bytes` for the engine; None when vLLM sizes it by profiling."""
        return self.kv_budget.kv_bytes if self.kv_budget else None

    @property
    def cuda_visible_devices(self) -> str:
        """UUIDs for real GPUs (immune to CUDA vs NVML index order), indices for mock ones."""
        if self.mock or not all(self.uuids):
            return ",".join(str(i) for i in self.gpus)
        return ",".join(self.uuids)

    @property
    def context_gib(self) -> float:
        """Per-process memory outside the engine's own budget: the CUDA context, and with
        TP/PP the NCCL buffers (measured on an H200, docs/gpu.md)."""
        return context_gib(len(self.gpus))

    @property
    def gpu_memory_utilization(self) -> float:
        """The engine's own budget (reservation minus the context) over the smallest GPU's
        total: vLLM's --gpu-memory-utilization, torch's memory fraction."""
        budget = max(self.gib_per_gpu - self.context_gib, self.gib_per_gpu / 2)
        return algo.gpu_memory_utilization(budget, self.total_gib)

    def env(self) -> dict[str, str]:
        """Environment for the engine process."""
        return {
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "CUDA_VISIBLE_DEVICES": self.cuda_visible_devices,
        }

    def reservation(self, engine_id: str) -> GpuReservation:
        """The ledger entry for this placement."""
        return GpuReservation(engine_id, list(self.gpus), self.gib_per_gpu, self.mock)

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpus": list(self.gpus),
            "uuids": list(self.uuids),
            "gib_per_gpu": self.gib_per_gpu,
            "total_gib": [round(t, 3) for t in self.total_gib],
            "mock": self.mock,
            "cuda_visible_devices": self.cuda_visible_devices,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "estimate": self.estimate.to_dict() if self.estimate else None,
            "kv_budget": self.kv_budget.to_dict() if self.kv_budget else None,
        }


def _describe(spec: EngineSpec) -> str:
    layout = f"tp {spec.tensor_parallel} x pp {spec.pipeline_parallel}"
    return f"{spec.model} ({spec.kind}, {layout})"


def plan_gpu(
    spec: EngineSpec, state: State, *, inventory: Inventory | None = None
) -> Placement | None:
    """Choose GPUs for an engine, or None when it runs on CPU.

    Call it under the state lock with a reconciled state, then store
    `placement.reservation(engine_id)` in `state.reservations` in the same
    transaction. Raises BadInput (bad --gpus, TP/PP, placement, unknown size)
    or ResourceUnavailable (no GPU when --use-gpu, nothing fits).
    """
    if spec.wants_gpu() is False:
        return None  # before NVML is read
    if spec.placement not in algo.PLACEMENTS:
        raise BadInput(f"unknown placement {spec.placement!r}", hint="use pack or spread")
    tp, pp = int(spec.tensor_parallel), int(spec.pipeline_parallel)
    if tp < 1 or pp < 1:
        raise BadInput("--tensor-parallel and --pipeline-parallel must be at least 1")
    if inventory is None:
        inventory = read_inventory(engine_pid_map(state))
    if not spec.gpu_count(inventory.available):
        return None  # an llm without GPUs runs on vLLM's CPU build
    if not inventory.available:
        reason = inventory.reason or "no usable GPU"
        raise ResourceUnavailable(
            f"no GPU available: {reason}",
            hint="drop --use-gpu to run on CPU, or set SAGELLM_MOCK_GPUS=1x80 to test placement",
        )
    estimate = estimate_for_spec(spec)
    caps = algo.capacities(inventory, state.reservations.values())
    chosen = algo.choose_gpus(
        caps,
        estimate.gib_per_gpu,
        tp * pp,
        what=_describe(spec),
        pinned=list(spec.gpus) if spec.gpus is not None else None,
        strategy=spec.placement,
        tensor_parallel=tp,
        nvlink_pairs=inventory.nvlink_pairs,
        topology=inventory.topology,
    )
    by_index = {g.index: g for g in inventory.gpus}
    return Placement(
        gpus=chosen,
        uuids=[by_index[i].uuid for i in chosen],
        gib_per_gpu=estimate.gib_per_gpu,
        total_gib=[by_index[i].total_gib for i in chosen],
        mock=inventory.mock,
        estimate=estimate,
        kv_budget=None if inventory.mock else kv_budget_for(spec, estimate.gib_per_gpu, tp * pp),
    )


def kv_budget_for(spec: EngineSpec, gib_per_gpu: float, gpu_count: int) -> KvBudget:
    """The KV budget under the current start mode: derived only in `concurrent` mode (in
    the others vLLM profiles, unless the spec gives --kv-cache-gb)."""
    runtime = resolve_runtime(spec.kind, spec.runtime)
    budget = derive_kv_budget(spec, runtime, gib_per_gpu, gpu_count)
    mode = start_mode()
    if mode != CONCURRENT and budget.kv_bytes is not None and spec.kv_cache_gb is None:
        return KvBudget(None, f"start mode {mode}: vLLM profiles", budget.parts_gib)
    return budget


def reservation_fits(state: State, reservation: GpuReservation) -> bool:
    """True if a sleeping engine's full reservation fits again beside the rest of the ledger.

    Its own process's current use (the part that stayed on the GPU) counts as available.
    """
    inventory = read_inventory(engine_pid_map(state))
    others = [r for r in state.reservations.values() if r.engine_id != reservation.engine_id]
    caps = {c.index: c for c in algo.capacities(inventory, others)}
    return all(
        i in caps
        and caps[i].free_gib + caps[i].engine_used.get(reservation.engine_id, 0.0)
        >= reservation.gib_per_gpu
        for i in reservation.gpus
    )


# --------------------------------------------------------------------------- `sage llm gpu`


@dataclass
class GpuSnapshot:
    """The inventory with our ledger on top: what `sage llm gpu` shows."""

    inventory: Inventory
    capacities: list[algo.GpuCapacity]
    reservations: list[GpuReservation]
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        inv = self.inventory
        if not inv.gpus and not inv.mock:
            return {"nvml": inv.nvml, "reason": inv.reason, "gpus": []}
        data = inv.to_dict()
        caps = {c.index: c for c in self.capacities}
        for gpu in data["gpus"]:
            cap = caps.get(gpu["index"])
            gpu["sagellm_reserved_gib"] = round(cap.reserved_gib, 3) if cap else 0.0
            gpu["plan_free_gib"] = round(cap.free_gib, 3) if cap else 0.0
            gpu["reservations"] = cap.to_dict()["reservations"] if cap else {}
        data["headroom_gib"] = algo.HEADROOM_GIB
        data["reservations"] = [
            {**r.to_dict(), **self.engines.get(r.engine_id, {}), **self.usage(r)}
            for r in self.reservations
        ]
        return data

    def usage(self, reservation: GpuReservation) -> dict[str, Any]:
        """What NVML says the engine's processes use on each of its GPUs, against what it
        reserved: `used_gib` per GPU, and `over` when any GPU is above the reservation."""
        caps = {c.index: c for c in self.capacities}
        used = [
            round(caps[i].engine_used.get(reservation.engine_id, 0.0), 3) if i in caps else None
            for i in reservation.gpus
        ]
        over = any(u is not None and u > reservation.gib_per_gpu for u in used)
        # The ledger's mark (set when the engine became ready) stays until it is restarted.
        return {"used_gib": used, "over": over or reservation.over_gib is not None}


def gpu_snapshot(state: State) -> GpuSnapshot:
    """Read the inventory (processes mapped to engine ids) and combine it with the ledger."""
    inventory = read_inventory(engine_pid_map(state))
    reservations = sorted(state.reservations.values(), key=lambda r: r.engine_id)
    engines = {
        r.engine_id: {
            "model": state.engines[r.engine_id].model,
            "status": state.engines[r.engine_id].status,
            "label": state.engines[r.engine_id].label,
        }
        for r in reservations
        if r.engine_id in state.engines
    }
    return GpuSnapshot(
        inventory=inventory,
        capacities=algo.capacities(inventory, reservations),
        reservations=reservations,
        engines=engines,
    )


# --------------------------------------------------------------------------- `sage llm gpu plan`


@dataclass
class LayoutCheck:
    """One TP x PP layout, its estimate, and whether it fits the GPUs present."""

    tensor_parallel: int
    pipeline_parallel: int
    estimate: MemoryEstimate
    fits_hardware: bool
    fits_now: bool
    gpus: list[int] | None = None
    problem: str | None = None
    in_table: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensor_parallel": self.tensor_parallel,
            "pipeline_parallel": self.pipeline_parallel,
            "gpu_count": self.tensor_parallel * self.pipeline_parallel,
            "gib_per_gpu": self.estimate.gib_per_gpu,
            "fits_hardware": self.fits_hardware,
            "fits_now": self.fits_now,
            "gpus": self.gpus,
            "problem": self.problem,
            "in_table": self.in_table,
            "estimate": self.estimate.to_dict(),
        }


@dataclass
class ModelPlan:
    """What `sage llm gpu plan MODEL` reports."""

    model: str
    kind: str
    params: float | None
    params_source: str
    tier: str | None
    layouts: list[LayoutCheck]
    chosen: LayoutCheck | None
    gpu_count: int
    mock: bool
    nvml: bool
    reason: str | None
    gpus: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "kind": self.kind,
            "params": self.params,
            "params_b": round(self.params / 1e9, 3) if self.params else None,
            "params_source": self.params_source,
            "recommendation": self.tier,
            "recommended": self.chosen.to_dict() if self.chosen else None,
            "fits": bool(self.chosen and self.chosen.fits_now),
            "layouts": [lay.to_dict() for lay in self.layouts],
            "nvml": self.nvml,
            "mock": self.mock,
            "reason": self.reason,
            "gpu_count": self.gpu_count,
            "gpus": self.gpus,
        }


def plan_model(
    model: str,
    state: State,
    *,
    kind: str = "llm",
    gpu_count: int | None = None,
    tensor_parallel: int | None = None,
    pipeline_parallel: int | None = None,
    max_model_len: int | None = None,
    gpu_memory_gb: float | None = None,
    kv_cache_gb: float | None = None,
    inventory: Inventory | None = None,
) -> ModelPlan:
    """Estimate `model`, recommend TP/PP (seed 001's table) and check it against the GPUs."""
    weights = read_weights(model, kind) if gpu_memory_gb is None else None
    if weights is not None and not weights.params:
        # Let estimate_memory word the error.
        estimate_memory(model, kind=kind, weights=weights)
    tier: str | None = None
    if tensor_parallel or pipeline_parallel:
        layouts = [(tensor_parallel or 1, pipeline_parallel or 1)]
    elif gpu_count is not None:
        layouts = [layout_for_gpu_count(gpu_count)]
    elif weights is not None and weights.params:
        tier, layouts = recommend_layouts(weights.params)
    else:
        layouts = [(1, 1)]
    if tier is None and weights is not None and weights.params:
        tier = recommend_layouts(weights.params)[0]
    if inventory is None:
        inventory = read_inventory(engine_pid_map(state))
    caps = algo.capacities(inventory, state.reservations.values())
    usable = sorted((c for c in caps if c.usable), key=lambda c: -c.total_gib)
    from_table = tier is not None and not (tensor_parallel or pipeline_parallel or gpu_count)
    # When the table's layouts don't fit the GPUs present, show what would.
    if from_table and inventory.available:
        counts = [n for n in (1, 2, 4, 8) if n <= len(usable)]
        layouts += [(n, 1) for n in counts if (n, 1) not in layouts]
    checks = []
    for position, (tp, pp) in enumerate(layouts):
        est = estimate_memory(
            model, kind=kind, tensor_parallel=tp, pipeline_parallel=pp,
            max_model_len=max_model_len, kv_cache_gb=kv_cache_gb,
            gpu_memory_gb=gpu_memory_gb, weights=weights,
        )  # fmt: skip
        count = tp * pp
        need = est.gib_per_gpu + algo.HEADROOM_GIB
        fits_hw = len(usable) >= count and usable[count - 1].total_gib >= need
        check = LayoutCheck(tp, pp, est, fits_hardware=fits_hw, fits_now=False)
        check.in_table = not from_table or position < len(recommend_layouts(weights.params)[1])
        if not inventory.available:
            check.problem = f"no GPUs to check against ({inventory.reason or 'none found'})"
        elif count > len(usable):
            check.problem = f"needs {count} GPUs, {len(usable)} present"
        elif not fits_hw:
            check.problem = (
                f"needs {need:.1f} GiB per GPU, the GPUs have {usable[count - 1].total_gib:.1f}"
            )
        else:
            try:
                check.gpus = algo.choose_gpus(
                    caps, est.gib_per_gpu, count, what=model, tensor_parallel=tp,
                    nvlink_pairs=inventory.nvlink_pairs, topology=inventory.topology,
                )  # fmt: skip
                check.fits_now = True
            except SageError:
                frees = ", ".join(f"{c.free_gib:.1f}" for c in caps if c.usable)
                check.problem = f"needs {need:.1f} GiB free on {count} GPU(s); free now: {frees}"
        checks.append(check)
    table = [c for c in checks if c.in_table]
    chosen = (
        next((c for c in table if c.fits_now), None)
        or next((c for c in table if c.fits_hardware), None)
        or next((c for c in checks if c.fits_now), None)
        or next((c for c in checks if c.fits_hardware), None)
        or (checks[0] if checks else None)
    )
    return ModelPlan(
        model=model,
        kind=kind,
        params=weights.params if weights else None,
        params_source=weights.source if weights else "override",
        tier=tier,
        layouts=checks,
        chosen=chosen,
        gpu_count=len(usable),
        mock=inventory.mock,
        nvml=inventory.nvml,
        reason=inventory.reason,
        gpus=[c.to_dict() for c in caps],
    )
