"""An engine that uses more GPU memory than it reserved, once it runs (NVML).

The promise is that an engine's processes stay within their reservation; a derived KV
cache (core/gpu/kv_budget.py) rests on a measured overhead table, so the first look after
`ready` checks it. Over by more than max(5 %, 0.5 GiB) on any GPU is marked in the ledger
(`over_gib`, shown by `sage llm gpu`), and `preset apply` fails and rolls back.
"""

from __future__ import annotations

from dataclasses import dataclass

from sagellm_cli.core.records import GpuReservation

TOLERANCE_SHARE = 0.05
TOLERANCE_MIN_GIB = 0.5


def tolerance_gib(reserved_gib: float) -> float:
    """How far NVML's figure may exceed (or fall short of) a reservation: max(5 %, 0.5 GiB)."""
    return max(TOLERANCE_SHARE * reserved_gib, TOLERANCE_MIN_GIB)


@dataclass
class OverUse:
    """The GPU where an engine is furthest over its reservation."""

    engine_id: str
    gpu: int
    used_gib: float
    reserved_gib: float

    @property
    def over_gib(self) -> float:
        return round(self.used_gib - self.reserved_gib, 3)

    def message(self) -> str:
        """One line naming the engine, the GPU and the figures."""
        return (
            f"engine {self.engine_id} uses {self.used_gib:.2f} GiB on GPU {self.gpu}, "
            f"{self.over_gib:.2f} GiB over its {self.reserved_gib:.2f} GiB reservation "
            f"(more than max(5 %, 0.5 GiB))"
        )


def find_overuse(reservation: GpuReservation, used_gib: dict[int, float]) -> OverUse | None:
    """The worst GPU where `used_gib` (NVML, the engine's processes) exceeds the reservation
    by more than the tolerance; None when it keeps to it (or is asleep)."""
    if reservation.asleep_gib is not None:
        return None
    limit = reservation.gib_per_gpu + tolerance_gib(reservation.gib_per_gpu)
    worst = None
    for gpu in reservation.gpus:
        used = used_gib.get(gpu)
        if used is not None and used > limit and (worst is None or used > worst.used_gib):
            worst = OverUse(reservation.engine_id, gpu, round(used, 3), reservation.gib_per_gpu)
    return worst


def from_ledger(reservation: GpuReservation | None) -> OverUse | None:
    """The over-use the ledger records for an engine, if any."""
    if reservation is None or reservation.over_gib is None or reservation.over_gpu is None:
        return None
    used = reservation.gib_per_gpu + reservation.over_gib
    return OverUse(reservation.engine_id, reservation.over_gpu, used, reservation.gib_per_gpu)


def engine_usage(state, engine_id: str) -> dict[int, float]:
    """NVML's GiB per GPU for the processes of one engine (its group and descendants)."""
    from sagellm_cli.core.gpu.inventory import engine_pid_map, read_inventory

    inventory = read_inventory(engine_pid_map(state))
    used: dict[int, float] = {}
    for gpu in inventory.gpus:
        for proc in gpu.processes:
            if proc.engine_id == engine_id and proc.used_mib is not None:
                used[gpu.index] = used.get(gpu.index, 0.0) + proc.used_mib / 1024
    return used
