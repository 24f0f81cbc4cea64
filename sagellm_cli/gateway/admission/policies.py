"""Scheduling policies as pure functions: queue order, engine preference, adaptive choice.

`scheduling.py` owns the queue and the per-engine accounting; this module only
answers "which waiting request goes first", "which engines may take it" and,
for `adaptive`, "which policy fits what is happening now". Nothing here does
I/O or keeps state, so the tests can check each rule directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from sagellm_cli.core.protocol import DEFAULT_PRIORITY, PRIORITY_CLASSES

if TYPE_CHECKING:
    from sagellm_cli.gateway.routing.backend import Backend

POLICIES = ("fifo", "priority", "slo_aware", "cost", "adaptive")
# The seeds' names (docs/gateway.md has the table), accepted by --scheduling.
POLICY_ALIASES = {"cost_optimized": "cost"}
# The policies `adaptive` switches between (it is never its own sub-policy).
SUB_POLICIES = ("fifo", "priority", "slo_aware", "cost")
PRIORITY_RANK = {name: rank for rank, name in enumerate(PRIORITY_CLASSES)}
DEFAULT_CLASS = DEFAULT_PRIORITY

# adaptive: below this share of admitted slots in use (and nothing queued) cost wins.
COST_UTILIZATION = 0.5


def deadline_ms(value: Any) -> float | None:
    """A relative deadline in ms from a header or body value; None if absent or malformed."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if isinstance(value, bool):
        return None
    try:
        ms = float(value)
    except (TypeError, ValueError):
        return None
    return ms if math.isfinite(ms) and ms >= 0 else None


def order_key(policy: str, seq: int, rank: int, deadline: float | None) -> tuple:
    """Sort key of a waiting request under `policy`: smaller goes first, ties by arrival."""
    if policy == "priority":
        return (rank, seq)
    if policy == "slo_aware":
        # Earliest deadline first; requests without a deadline follow. Ties (and the
        # deadline-less) go by priority class, then arrival.
        return (deadline if deadline is not None else math.inf, rank, seq)
    return (seq,)  # fifo and cost: arrival order


def engine_cost(backend: Backend) -> float:
    """`cost_per_1k_tokens` from the engine's spec (preset or engine metadata); unset = 0."""
    return backend.record.spec.cost_per_1k_tokens or 0.0


def cheapest(pool: list[Backend]) -> list[Backend]:
    """The engines of `pool` that share the lowest cost (pool is non-empty)."""
    if len(pool) == 1:
        return pool
    costs = [engine_cost(b) for b in pool]
    low = min(costs)
    return [b for b, c in zip(pool, costs, strict=True) if c == low]


def costs_differ(backends: Sequence[Backend]) -> bool:
    """True if the engines do not all cost the same (cost preference means something)."""
    seen: set[float] = set()
    for backend in backends:
        seen.add(engine_cost(backend))
        if len(seen) > 1:
            return True
    return False


def adaptive_choice(
    current: str,
    *,
    waiting: int,
    classes: Callable[[], int],
    with_deadline: int,
    utilization: float,
    costs_vary: Callable[[], bool],
) -> tuple[str, str]:
    """The sub-policy `adaptive` should run now, and why (for the INFO log).

    - Requests are queued: the order matters. Any deadline among them -> slo_aware;
      more than one priority class -> priority; otherwise fifo.
    - Nothing is queued: the order is moot and only engine choice matters. Engines with
      different costs and utilization under 50 % -> cost (use the cheap ones while there
      is slack); past that, cost concentration would add latency, so leave cost (-> fifo).
      Otherwise keep the current policy (no flapping when a queue drains).
    `classes` and `costs_vary` are callables so the common case computes neither.
    """
    if waiting:
        if with_deadline:
            return "slo_aware", f"{with_deadline} of {waiting} queued requests carry a deadline"
        n = classes()
        if n > 1:
            return "priority", f"{waiting} queued requests in {n} priority classes"
        return "fifo", f"{waiting} queued requests, one class, no deadlines"
    if utilization < COST_UTILIZATION and costs_vary():
        return (
            "cost",
            f"nothing queued, {utilization:.0%} of engine slots in use and engines differ in cost",
        )
    if current == "cost":
        if utilization >= COST_UTILIZATION:
            return "fifo", f"{utilization:.0%} of engine slots in use: spread load, not by cost"
        return "fifo", "engines no longer differ in cost"
    return current, "no change"
