"""CPU cores for vLLM engines that run on the CPU.

vLLM's CPU build binds its OpenMP threads to every core by default. Two such engines
on one machine then spin on the same cores and each runs ~12x slower (measured in
docs/benchmarks.md), so every CPU engine gets its own share of the cores instead.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable


def available_cores() -> list[int]:
    """The cores this process may run on."""
    return sorted(os.sched_getaffinity(0))


def cores_per_engine(total: int) -> int:
    """`SAGELLM_CPU_CORES_PER_ENGINE`, else half the cores (at least one)."""
    configured = os.environ.get("SAGELLM_CPU_CORES_PER_ENGINE", "").strip()
    if configured.isdigit() and int(configured) > 0:
        return min(int(configured), total)
    return max(1, total // 2)


def pick_cores(in_use: Iterable[list[int]], cores: list[int] | None = None) -> list[int]:
    """The least used cores, given the core lists of the CPU engines already running."""
    cores = cores if cores is not None else available_cores()
    load = Counter(core for engine in in_use for core in engine)
    ranked = sorted(cores, key=lambda core: (load[core], core))
    return sorted(ranked[: cores_per_engine(len(cores))])
