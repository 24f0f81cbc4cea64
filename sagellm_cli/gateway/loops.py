"""The gateway's background loops (state watch, health checks, supervisor) share one shape."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("sagellm.gateway")


async def every(
    interval: float, step: Callable[[], Awaitable[object]], failure: str, *, wait_first=False
) -> None:
    """Run `step` forever, `interval` seconds apart. A failed step is logged as
    `failure: <error>` and the loop goes on: nothing may kill the gateway's loops."""
    if wait_first:
        await asyncio.sleep(interval)
    while True:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the loop must survive anything
            log.warning("%s: %s", failure, exc)
        await asyncio.sleep(interval)
