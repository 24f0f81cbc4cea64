"""Pure GPU placement: capacities from an inventory snapshot plus the ledger, then a choice.

Nothing here reads NVML or the state file, so every rule is unit-testable with
mock GPUs. Free memory for planning, per GPU:

    free = total - other_used - sum over engines reserved here of max(reserved, used)

where `other_used` is NVML's occupied memory (processes and the driver's own
reserve) minus what our reserved engines' processes use there. A running engine
is therefore counted once, at the larger of its reservation and its real use.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sagellm_cli.core.errors import BadInput, ResourceUnavailable
from sagellm_cli.core.gpu.inventory import TOPOLOGY_RANK, Inventory
from sagellm_cli.core.records import GpuReservation

# A new engine needs this much beyond its reservation at start: vLLM compares free
# memory, after its own CUDA context exists, with utilization x total, and refuses
# to start when it is short.
HEADROOM_GIB = 0.5
# Above this many candidate sets, pick greedily instead of enumerating.
_MAX_COMBINATIONS = 50_000
PLACEMENTS = ("pack", "spread")


@dataclass
class GpuCapacity:
    """The planning view of one GPU."""

    index: int
    name: str
    uuid: str
    total_gib: float
    other_used_gib: float
    reserved: dict[str, float] = field(default_factory=dict)
    engine_used: dict[str, float] = field(default_factory=dict)
    mock: bool = False
    usable: bool = True

    @property
    def reserved_gib(self) -> float:
        """Our reservations on this GPU."""
        return sum(self.reserved.values())

    @property
    def held_gib(self) -> float:
        """Reserved engines at the larger of reservation and real use."""
        return sum(max(gib, self.engine_used.get(e, 0.0)) for e, gib in self.reserved.items())

    @property
    def free_gib(self) -> float:
        """What a new reservation may take (before headroom)."""
        if not self.usable:
            return 0.0
        return max(self.total_gib - self.other_used_gib - self.held_gib, 0.0)

    @property
    def label(self) -> str:
        return f"GPU {self.index}" + (" (mock)" if self.mock else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "uuid": self.uuid,
            "mock": self.mock,
            "usable": self.usable,
            "total_gib": round(self.total_gib, 3),
            "other_used_gib": round(self.other_used_gib, 3),
            "reserved_gib": round(self.reserved_gib, 3),
            "free_gib": round(self.free_gib, 3),
            "reservations": {e: round(g, 3) for e, g in sorted(self.reserved.items())},
            "engine_used_gib": {e: round(g, 3) for e, g in sorted(self.engine_used.items())},
        }


def capacities(inventory: Inventory, reservations: Iterable[GpuReservation]) -> list[GpuCapacity]:
    """Per-GPU capacity from an inventory and the ledger.

    Reservations made on the other kind of GPU (mock vs real) are ignored: the
    ledger may outlive a change of `SAGELLM_MOCK_GPUS`.
    """
    ledger = [r for r in reservations if bool(r.mock) == bool(inventory.mock)]
    caps = []
    for gpu in inventory.gpus:
        reserved: dict[str, float] = {}
        for res in ledger:
            if gpu.index in res.gpus:
                reserved[res.engine_id] = reserved.get(res.engine_id, 0.0) + res.held_gib
        engine_used: dict[str, float] = {}
        for proc in gpu.processes:
            if proc.engine_id and proc.used_mib is not None:
                engine_used[proc.engine_id] = engine_used.get(proc.engine_id, 0.0) + (
                    proc.used_mib / 1024
                )
        # Only usage of engines that hold a reservation here is covered by the ledger.
        covered = sum(g for e, g in engine_used.items() if e in reserved)
        caps.append(
            GpuCapacity(
                index=gpu.index,
                name=gpu.name,
                uuid=gpu.uuid,
                total_gib=gpu.total_gib,
                other_used_gib=max(gpu.occupied_gib - covered, 0.0),
                reserved=reserved,
                engine_used=engine_used,
                mock=gpu.mock,
                usable=gpu.error is None,
            )
        )
    return caps


def describe_capacities(caps: list[GpuCapacity]) -> str:
    """`GPU 0 (mock) Mock GPU 80GiB: 40.0 GiB free of 80.0, 40.0 reserved by sagellm; ...`"""
    parts = []
    for cap in caps:
        if not cap.usable:
            parts.append(f"{cap.label}: unavailable")
            continue
        parts.append(
            f"{cap.label} {cap.name}: {cap.free_gib:.1f} GiB free of {cap.total_gib:.1f}, "
            f"{cap.reserved_gib:.1f} reserved by sagellm"
        )
    return "; ".join(parts)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _no_fit(what: str, need: float, count: int, caps: list[GpuCapacity], why: str = ""):
    each = " each" if count > 1 else ""
    need_text = (
        f"{_plural(count, 'GPU')} with {need:.1f} GiB free{each} (+{HEADROOM_GIB:g} headroom)"
    )
    reason = f": {why}" if why else ""
    return ResourceUnavailable(
        f"not enough GPU memory for {what}{reason}; needs {need_text}; "
        f"{describe_capacities(caps) or 'no GPUs'}",
        hint="stop an engine, lower --gpu-memory-gb / --max-model-len, "
        "or split the model over more GPUs with --tensor-parallel",
    )


def _set_key(
    combo: tuple[GpuCapacity, ...],
    strategy: str,
    prefer_nvlink: bool,
    nvlink_pairs: set[frozenset[int]],
    topology: dict[frozenset[int], str],
):
    pairs = [frozenset((a.index, b.index)) for a, b in itertools.combinations(combo, 2)]
    linked = sum(1 for p in pairs if p in nvlink_pairs)
    all_linked = linked == len(pairs)
    distance = sum(TOPOLOGY_RANK.get(_level(topology.get(p, "?")), 7) for p in pairs)
    frees = [c.free_gib for c in combo]
    fit = sum(frees) if strategy == "pack" else -min(frees)
    spread_tiebreak = 0.0 if strategy == "pack" else -sum(frees)
    locality = (0 if all_linked else 1, -linked, distance) if prefer_nvlink else (0, 0, 0)
    return (*locality, fit, spread_tiebreak, tuple(c.index for c in combo))


def _level(name: str) -> str:
    return "NV" if name.startswith("NV") else name


def choose_gpus(
    caps: list[GpuCapacity],
    need_gib: float,
    count: int,
    *,
    what: str = "the engine",
    pinned: list[int] | None = None,
    strategy: str = "pack",
    tensor_parallel: int = 1,
    nvlink_pairs: set[frozenset[int]] | None = None,
    topology: list[list[str]] | None = None,
) -> list[int]:
    """Choose `count` GPU indices that each have `need_gib` (+ headroom) free.

    pack: best fit (least free memory left over); spread: most free memory.
    With TP > 1, fully NVLink-connected sets win over others, then closer
    PCIe topology. Raises BadInput for a bad pin and ResourceUnavailable when
    nothing fits.
    """
    if strategy not in PLACEMENTS:
        raise BadInput(f"unknown placement {strategy!r}", hint="use pack or spread")
    if count < 1:
        raise BadInput("an engine needs at least one GPU")
    nvlink_pairs = nvlink_pairs or set()
    by_index = {c.index: c for c in caps}
    topo_pairs: dict[frozenset[int], str] = {}
    if topology:
        ordered = [c.index for c in caps]
        for i, a in enumerate(ordered):
            for j, b in enumerate(ordered):
                if i < j and i < len(topology) and j < len(topology[i]):
                    topo_pairs[frozenset((a, b))] = topology[i][j]
    required = need_gib + HEADROOM_GIB

    if pinned is not None:
        present = ", ".join(str(i) for i in sorted(by_index)) or "none"
        unknown = [i for i in pinned if i not in by_index]
        if unknown:
            raise BadInput(
                f"--gpus names GPU {unknown[0]}, which does not exist (GPUs present: {present})",
                hint="see `sage llm gpu` for the indices",
            )
        if len(set(pinned)) != len(pinned):
            raise BadInput(f"--gpus lists a GPU twice: {','.join(map(str, pinned))}")
        if len(pinned) != count:
            raise BadInput(
                f"--gpus lists {_plural(len(pinned), 'GPU')} but tensor_parallel x "
                f"pipeline_parallel = {count}",
                hint=f"list exactly {count} indices, or change --tensor-parallel",
            )
        short = [by_index[i] for i in pinned if by_index[i].free_gib < required]
        if short:
            raise _no_fit(what, need_gib, count, caps, f"pinned {short[0].label} is too full")
        return list(pinned)

    usable = [c for c in caps if c.usable]
    if len(usable) < count:
        raise ResourceUnavailable(
            f"{what} needs {_plural(count, 'GPU')} but {_plural(len(usable), 'GPU')} "
            f"{'is' if len(usable) == 1 else 'are'} present",
            hint="lower --tensor-parallel / --pipeline-parallel",
        )
    fitting = [c for c in usable if c.free_gib >= required]
    if len(fitting) < count:
        raise _no_fit(what, need_gib, count, caps)
    if count == 1:
        if strategy == "pack":
            best = min(fitting, key=lambda c: (c.free_gib, c.index))
        else:
            best = min(fitting, key=lambda c: (-c.free_gib, c.index))
        return [best.index]
    prefer_nvlink = tensor_parallel > 1
    n_sets = _combinations(len(fitting), count)
    if n_sets > _MAX_COMBINATIONS:
        ordered = sorted(
            fitting, key=lambda c: (c.free_gib if strategy == "pack" else -c.free_gib, c.index)
        )
        return sorted(c.index for c in ordered[:count])
    best_combo = min(
        itertools.combinations(sorted(fitting, key=lambda c: c.index), count),
        key=lambda combo: _set_key(combo, strategy, prefer_nvlink, nvlink_pairs, topo_pairs),
    )
    return [c.index for c in best_combo]


def _combinations(n: int, k: int) -> int:
    from math import comb

    return comb(n, k)


def gpu_memory_utilization(gib_per_gpu: float, totals_gib: list[float]) -> float:
    """reserved / total of the smallest chosen GPU, rounded down to 3 decimals, in (0, 0.95]."""
    if not totals_gib or min(totals_gib) <= 0:
        return 0.95
    ratio = gib_per_gpu / min(totals_gib)
    value = int(ratio * 1000 + 1e-9) / 1000
    return min(max(value, 0.001), 0.95)
