"""`--scheduling adaptive`: when to switch sub-policy.

The rules themselves are `policies.adaptive_choice`; this adds what needs state: the
dwell time between two switches, the INFO log line with the reason, and the switch count.
The scheduler owns the queues and re-orders them after a switch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

from sagellm_cli.gateway.admission.policies import adaptive_choice

log = logging.getLogger("sagellm.gateway")

# The least time between two switches (no flapping on every request).
ADAPTIVE_DWELL_S = 1.0


class AdaptiveSwitcher:
    """Decides, at most once per dwell time, which sub-policy `adaptive` runs."""

    __slots__ = ("switches", "_switched_at")

    def __init__(self) -> None:
        self.switches = 0
        self._switched_at = -math.inf

    def decide(
        self,
        current: str,
        now: float,
        *,
        waiting: int,
        class_waiting: Sequence[int],
        with_deadline: int,
        utilization: Callable[[], float],
        costs_vary: Callable[[], bool],
    ) -> str | None:
        """The sub-policy to switch to now, or None to keep `current`.

        `class_waiting` counts the waiters per priority class; `utilization` and
        `costs_vary` are callables so that nothing is computed within the dwell time.
        """
        if now - self._switched_at < ADAPTIVE_DWELL_S:
            return None
        target, reason = adaptive_choice(
            current,
            waiting=waiting,
            classes=lambda: sum(1 for n in class_waiting if n),
            with_deadline=with_deadline,
            utilization=utilization(),
            costs_vary=costs_vary,
        )
        if target == current:
            return None
        log.info("scheduling: adaptive switched %s -> %s (%s)", current, target, reason)
        self._switched_at = now
        self.switches += 1
        return target
