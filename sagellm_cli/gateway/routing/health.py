"""Active health checks: GET /health on every engine at an interval (`/v1/models` for an
external engine, which may have no /health).

Passive checks (connection errors and 5xx on real requests) are counted by the
proxy through the same `Registry.mark_failure` / `mark_success`; K consecutive
failures of either kind mark an engine unhealthy, one success heals it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from sagellm_cli.core.engines.probe import probe_request
from sagellm_cli.core.launchers.base import launcher_for
from sagellm_cli.core.lifecycle import Status
from sagellm_cli.core.protocol import health_path
from sagellm_cli.gateway.loops import every

if TYPE_CHECKING:
    from sagellm_cli.gateway.http.upstream import Upstream
    from sagellm_cli.gateway.routing.backend import Backend
    from sagellm_cli.gateway.routing.registry import Registry

log = logging.getLogger("sagellm.gateway")


class HealthChecker:
    """Probes every engine concurrently, every `interval` seconds."""

    def __init__(self, registry: Registry, upstream: Upstream, interval: float, timeout: float):
        self.registry = registry
        self.upstream = upstream
        self.interval = interval
        self.timeout = timeout
        self.rounds = 0

    async def check(self, backend: Backend) -> bool:
        """One probe. A dead engine process counts as fatal at once (no need to wait K rounds)."""
        record = backend.record
        if not backend.checkable:
            return False  # unloaded, asleep, restarting or hung: the supervisor owns it
        if record.pid and not await _alive(record):
            self.registry.mark_failure(backend, "engine process is gone", fatal=True)
            return False
        try:
            if record.status == Status.STARTING:
                # Into rotation only once it answers a real request (ready means it answers).
                path, payload = probe_request(record.kind, record.served_model_name)
                status = await self.upstream.post_status(backend.url + path, payload, self.timeout)
            else:
                path = health_path(record.is_external)
                status = await self.upstream.get_status(backend.url + path, self.timeout)
        except Exception as exc:  # noqa: BLE001 - any failure to answer is a failed probe
            self.registry.mark_failure(backend, f"health check failed: {type(exc).__name__}")
            return False
        if status == 200:
            self.registry.mark_success(backend)
            return True
        self.registry.mark_failure(backend, f"health check answered {status}")
        return False

    async def run_once(self) -> None:
        """Probe every known engine once."""
        backends = list(self.registry.backends.values())
        if backends:
            await asyncio.gather(*(self.check(b) for b in backends), return_exceptions=True)
        self.rounds += 1

    async def run(self) -> None:
        """Probe forever."""
        await every(self.interval, self.run_once, "health round failed")


async def _alive(record) -> bool:
    """The launcher's liveness check: two /proc reads here, a remote call (in a thread, off
    the event loop) for an engine on a Ray node."""
    launcher = launcher_for(record.node)
    if launcher.on_this_machine:
        return launcher.is_alive(record)
    return await asyncio.to_thread(launcher.is_alive, record)
