"""The supervisor: restart policies, hung-engine probes, idle unload and wake on request.

A loop inside `sage llm serve`, the one long-running process. Engines are never its
children: every action is an `EngineManager` state transition under the state lock, so
the CLI sees it at once, and restarting the gateway leaves the engines running. Only the
gateway recorded in the state file supervises (a second, unrecorded one just routes).

One action runs per engine at a time (a restart, an unload, a wake, a probe); requests
for an unloaded model share its one wake.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from prometheus_client import Counter

from sagellm_cli.core.engines import EngineManager
from sagellm_cli.core.errors import ResourceUnavailable, SageError
from sagellm_cli.core.lifecycle import Status
from sagellm_cli.core.probe import probe_request
from sagellm_cli.core.protocol import ENGINE_SLEEP, ENGINE_WAKE
from sagellm_cli.gateway.loops import every

if TYPE_CHECKING:
    from sagellm_cli.core.records import EngineRecord
    from sagellm_cli.core.state import State, StateStore
    from sagellm_cli.gateway.backend import Backend
    from sagellm_cli.gateway.config import GatewayConfig
    from sagellm_cli.gateway.registry import ModelGroup, Registry
    from sagellm_cli.gateway.upstream import Upstream

log = logging.getLogger("sagellm.gateway")

# vLLM's /sleep and /wake_up move weights between host and GPU: allow them time.
SLEEP_TIMEOUT_S = 120.0
# What a sleeping vLLM engine keeps on each GPU, for the ledger (NVML's real figure counts
# where larger). Measured on an H200: 19.7 GiB awake, 1.3 GiB for the whole GPU asleep.
ASLEEP_GIB = 1.0


class WakeFailed(Exception):
    """An unloaded model could not be loaded for a request (the proxy answers 503)."""


class Supervisor:
    """Applies restart policies and keep_alive to the engines in the state file."""

    def __init__(
        self,
        config: GatewayConfig,
        registry: Registry,
        upstream: Upstream,
        metrics_registry,
        store: StateStore,
    ):
        self.config = config
        self.registry = registry
        self.upstream = upstream
        self.manager = EngineManager(store)
        self.active = False
        # engine id -> (action, task): one action per engine at a time.
        self._actions: dict[str, tuple[str, asyncio.Task]] = {}
        labels = ["engine", "model"]
        self.restarts = Counter(
            "sagellm_engine_restarts", "Engines restarted by the supervisor.", labels,
            registry=metrics_registry,
        )  # fmt: skip
        self.unloads = Counter(
            "sagellm_engine_unloads", "Engines unloaded after keep_alive without requests.",
            labels, registry=metrics_registry,
        )  # fmt: skip
        self.wakes = Counter(
            "sagellm_engine_wakes", "Unloaded or sleeping engines loaded for a request.",
            labels, registry=metrics_registry,
        )  # fmt: skip

    # -- the loop ------------------------------------------------------------

    async def run(self) -> None:
        """Supervise forever (reconciling the state file every round)."""
        interval = self.config.supervise_interval_s
        await every(interval, self.round, "supervisor round failed", wait_first=True)

    async def round(self) -> None:
        """Reconcile (dead engines found, their helpers reaped), then act on what is due."""
        state = await asyncio.to_thread(self.manager.refresh)
        active = state.gateway is not None and state.gateway.pid == os.getpid()
        if active != self.active:
            self.active = active
            log.warning(
                "supervisor %s", "active" if active else "inactive: not the recorded gateway"
            )
        if not active:
            return
        await self.registry.refresh()
        self._restart_due(state)
        now = time.monotonic()
        for backend in list(self.registry.backends.values()):
            if backend.id in self._actions or backend.record.status != Status.READY:
                continue
            keep_alive = backend.record.spec.keep_alive
            if keep_alive >= 0 and backend.inflight == 0 and now - backend.last_used >= keep_alive:
                self._start(backend.id, "unload", lambda b=backend: self._unload(b))
            elif self._probe_due(backend, now):
                self._start(backend.id, "probe", lambda b=backend: self._probe(b))

    def _restart_due(self, state: State) -> None:
        now = time.time()
        for record in state.engines.values():
            if (
                record.status == Status.RESTARTING
                and not record.orphans
                and record.id not in self._actions
                and (record.next_restart_at or 0) <= now
            ):
                self._start(record.id, "restart", lambda r=record: self._restart(r))

    def _start(self, engine_id: str, action: str, make: Callable[[], Awaitable]) -> asyncio.Task:
        task = asyncio.create_task(make(), name=f"{action}-{engine_id}")
        self._actions[engine_id] = (action, task)
        task.add_done_callback(lambda t: self._finished(engine_id, action, t))
        return task

    def _finished(self, engine_id: str, action: str, task: asyncio.Task) -> None:
        if self._actions.get(engine_id, (None, None))[1] is task:
            del self._actions[engine_id]
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            message = exc.message if isinstance(exc, SageError) else f"{type(exc).__name__}: {exc}"
            log.warning("%s of engine %s failed: %s", action, engine_id, message)

    async def stop(self) -> None:
        """Cancel running actions (their engines keep whatever state they reached)."""
        tasks = [task for _, task in self._actions.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def status(self) -> dict:
        """For the management status document."""
        return {
            "active": self.active,
            "actions": {engine: action for engine, (action, _) in self._actions.items()},
        }

    # -- actions -------------------------------------------------------------

    async def _restart(self, record: EngineRecord) -> None:
        log.warning(
            "restarting engine %s (%s), restart %d", record.id, record.error, record.restarts + 1
        )
        fresh = await asyncio.to_thread(
            self.manager.revive, record.id, timeout=self.config.wake_timeout_s
        )
        if fresh is not None:
            self.restarts.labels(fresh.id, fresh.served_model_name).inc()
            log.warning("engine %s is ready again (pid %s)", fresh.id, fresh.pid)
            await self.registry.refresh(force=True)

    async def _unload(self, backend: Backend) -> None:
        record = backend.record
        self.registry.drain(backend)  # no new request reaches it from here on
        if record.spec.unload == "sleep":
            status = await self.upstream.post_status(
                f"{backend.url}{ENGINE_SLEEP}?level=1", b"", SLEEP_TIMEOUT_S
            )
            if status != 200:
                self.registry.mark_success(backend)
                raise WakeFailed(f"{ENGINE_SLEEP} answered {status}")
            if not await asyncio.to_thread(self.manager.mark_asleep, record.id, ASLEEP_GIB):
                return  # stopped or crashed meanwhile: it stays so (logged by the table)
        elif await asyncio.to_thread(self.manager.unload, record.id) is None:
            return  # stopped meanwhile
        self.unloads.labels(record.id, record.served_model_name).inc()
        log.warning(
            "engine %s unloaded (%s) after %.0fs without requests",
            record.id, record.spec.unload, time.monotonic() - backend.last_used,
        )  # fmt: skip
        await self.registry.refresh(force=True)

    def _probe_due(self, backend: Backend, now: float) -> bool:
        interval = self.config.probe_interval_s
        return (
            interval > 0
            and not backend.record.is_external  # someone else's server, maybe paid per token
            and backend.inflight == 0
            and now - backend.last_used >= interval
            and now - backend.last_probe >= interval
        )

    async def _probe(self, backend: Backend) -> None:
        """A one-token generation (or a one-input embedding) under a timeout: an engine that
        answers /health but hangs fails it. K failures in a row: drained and, under a
        restart policy, killed and restarted."""
        backend.last_probe = time.monotonic()
        path, payload = probe_request(backend.kind, backend.served_model_name)
        try:
            status = await asyncio.wait_for(
                self.upstream.post_status(backend.url + path, payload, self.config.probe_timeout_s),
                self.config.probe_timeout_s,
            )
            failure = None if status == 200 else f"generation probe answered {status}"
        except Exception as exc:  # noqa: BLE001 - any failure to answer is a failed probe
            failure = f"generation probe failed: {type(exc).__name__}"
        if failure is None:
            backend.probe_failures = 0
            if backend.hung:
                backend.hung = False
                await asyncio.to_thread(self.manager.mark_unresponsive, backend.id, None)
                self.registry.mark_success(backend)
            return
        backend.probe_failures += 1
        if backend.probe_failures < self.config.failure_threshold:
            return
        reason = f"{failure} {backend.probe_failures} times in a row (alive but not answering)"
        log.warning("engine %s unhealthy: %s", backend.id, reason)
        self.registry.drain(backend, hung=True)
        await asyncio.to_thread(self.manager.mark_unresponsive, backend.id, reason)
        if backend.record.spec.restart != "no":
            await asyncio.to_thread(self.manager.recycle, backend.id, reason)
            await self.registry.refresh(force=True)

    # -- wake on request -----------------------------------------------------

    async def wake(self, group: ModelGroup) -> ModelGroup:
        """Load an engine of `group` for a request; the fresh group once one is healthy.

        Requests share one wake per engine. Raises WakeFailed after `--wake-timeout`, or
        at once when it cannot succeed (no memory and nothing idle to unload).
        """
        candidates = [b for b in group.backends if b.wakeable]
        if not candidates:
            return group
        # A sleeping engine wakes fastest; then the most recently used.
        backend = min(candidates, key=lambda b: (b.record.status != Status.SLEEPING, -b.last_used))
        try:
            await asyncio.wait_for(self._shared_wake(backend), self.config.wake_timeout_s)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            raise WakeFailed(
                f"model {group.name!r} is still loading after {self.config.wake_timeout_s:.0f}s"
            ) from None
        fresh = self.registry.group(group.kind, group.name)
        return fresh if fresh is not None else group

    async def _shared_wake(self, backend: Backend) -> None:
        while True:
            action, task = self._actions.get(backend.id, (None, None))
            if task is None:
                task = self._start(backend.id, "wake", lambda: self._load(backend.id))
            elif action != "wake":
                # An unload or probe in progress: let it finish, then wake.
                with contextlib.suppress(Exception):
                    await asyncio.shield(task)
                continue
            try:
                await asyncio.shield(task)
            except WakeFailed:
                raise
            except SageError as exc:
                raise WakeFailed(exc.message) from None
            return

    async def _load(self, engine_id: str) -> None:
        # The state file, not the registry's copy: an unload may have just finished.
        record = (await asyncio.to_thread(self.manager.store.read)).engines.get(engine_id)
        if record is None:
            raise WakeFailed(f"engine {engine_id} was removed")
        started = time.monotonic()
        if record.status in (Status.SLEEPING, Status.WAKING):  # WAKING: left by a dead gateway
            if not await self._wake_up(record):
                return  # another gateway woke it meanwhile
        elif record.status == Status.IDLE:
            await self._with_room(
                record, lambda: self.manager.wake(engine_id, timeout=self.config.wake_timeout_s)
            )
        else:
            return
        self.wakes.labels(engine_id, record.served_model_name).inc()
        log.warning(
            "engine %s loaded for a request in %.1fs", engine_id, time.monotonic() - started
        )
        await self.registry.refresh(force=True)

    async def _wake_up(self, record: EngineRecord) -> bool:
        """SLEEPING -> WAKING (full reservation back) -> /wake_up -> READY. True if this
        call woke it, False if another gateway did; WakeFailed if it was stopped or
        crashed meanwhile (the table refuses READY then, and it stays so)."""
        engine_id = record.id
        woken: list[bool] = []
        await self._with_room(record, lambda: woken.append(self.manager.reclaim(engine_id)))
        if not woken[-1]:
            return await self._awake_elsewhere(engine_id)
        try:
            status = await self.upstream.post_status(
                f"{record.url}{ENGINE_WAKE}", b"", self.config.wake_timeout_s
            )
        except BaseException:
            # Cancelled or unreachable: back to SLEEPING with the full reservation kept
            # (vLLM may be half awake), so that the next request tries again.
            await asyncio.to_thread(self.manager.mark_awake, engine_id, woke=False)
            raise
        if status != 200:
            await asyncio.to_thread(self.manager.mark_awake, engine_id, woke=False)
            raise WakeFailed(f"engine {engine_id} did not wake: {ENGINE_WAKE} answered {status}")
        if not await asyncio.to_thread(self.manager.mark_awake, engine_id):
            return await self._awake_elsewhere(engine_id)
        return True

    async def _awake_elsewhere(self, engine_id: str) -> bool:
        """After a refused wake step: False if the engine is READY (another gateway woke
        it), else WakeFailed naming what it became."""
        record = (await asyncio.to_thread(self.manager.store.read)).engines.get(engine_id)
        if record is not None and record.status == Status.READY:
            return False
        now = record.status if record is not None else "removed"
        raise WakeFailed(f"engine {engine_id} was {now} while waking; not woken")

    async def _with_room(self, record: EngineRecord, load: Callable[[], object]) -> None:
        """Run `load` in a thread; while GPU memory is short, unload the least recently used
        idle-eligible engine first (as Ollama's scheduler does) and try again."""
        while True:
            try:
                await asyncio.to_thread(load)
                return
            except ResourceUnavailable as exc:
                victim = self._eviction_candidate(record.id)
                unloading = [t for a, t in self._actions.values() if a == "unload"]
                if victim is None and unloading:
                    # Memory is on its way back: wait for those unloads, then try again.
                    await asyncio.wait(unloading)
                    continue
                if victim is None:
                    raise WakeFailed(
                        f"cannot load model {record.served_model_name!r}: {exc.message}; "
                        "no idle engine (keep_alive set) to unload"
                    ) from None
                log.warning("unloading engine %s to make room for %s", victim.id, record.id)
                await self._start(victim.id, "unload", lambda v=victim: self._unload(v))

    def _eviction_candidate(self, engine_id: str) -> Backend | None:
        idle = [
            b
            for b in self.registry.backends.values()
            if b.id != engine_id
            and b.id not in self._actions
            and b.record.status == Status.READY
            and b.record.gpus
            and b.record.spec.keep_alive >= 0
            and b.inflight == 0
        ]
        return min(idle, key=lambda b: b.last_used, default=None)
