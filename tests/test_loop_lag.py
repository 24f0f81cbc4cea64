"""The gateway's event-loop lag histogram records the time other work held the loop."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from sagellm_cli.gateway.telemetry.metrics import Metrics


def _sample(text: str, name: str) -> float:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
    return float(line.split()[1])


def test_a_blocked_loop_shows_as_lag():
    metrics = Metrics(SimpleNamespace(backends={}))

    async def run() -> None:
        probe = asyncio.create_task(metrics.probe_loop_lag())
        await asyncio.sleep(0.12)  # a few idle probes first
        time.sleep(0.3)  # work that holds the loop: the next wake-up comes late
        await asyncio.sleep(0.12)
        probe.cancel()

    asyncio.run(run())
    text = metrics.render().decode()
    assert _sample(text, "sagellm_gateway_event_loop_lag_seconds_count") >= 3
    # The 0.3 s block lands in one observation, at most one probe interval early.
    assert _sample(text, "sagellm_gateway_event_loop_lag_seconds_sum") >= 0.25
    over = 'sagellm_gateway_event_loop_lag_seconds_bucket{le="0.1"}'
    count = _sample(text, "sagellm_gateway_event_loop_lag_seconds_count")
    assert _sample(text, over) == count - 1  # only the blocked wake-up was late
