"""The supervisor: restart policies, hung-engine probes, idle unload and wake on request.

A loop inside `sage llm serve`, the one long-running process. Engines are never its
children: every action is an `EngineManager` state transition under the state lock, so
the CLI sees it at once, and restarting the gateway leaves the engines running. Only the
gateway recorded in the state file supervises (a second, unrecorded one just routes).

One action runs per engine at a time (a restart, an unload, a wake, a probe); requests
for an unloaded model share its one wake, and wait in that model's queue meanwhile.
Which engine makes room for another is core/engines/scheduler.py's decision (reference counts,
pins and leases, cost); this module gathers what it needs and does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from prometheus_client import Counter

from sagellm_cli.core.engines import scheduler
from sagellm_cli.core.engines.manager import EngineManager
from sagellm_cli.core.engines.probe import probe_request
from sagellm_cli.core.errors import ResourceUnavailable, SageError
from sagellm_cli.core.lifecycle import LOADING, Status
from sagellm_cli.core.protocol import ENGINE_SLEEP, ENGINE_WAKE
from sagellm_cli.gateway.loops import every

if TYPE_CHECKING:
    from sagellm_cli.core.records import EngineRecord
    from sagellm_cli.core.state import State, StateStore
    from sagellm_cli.gateway.config import GatewayConfig
    from sagellm_cli.gateway.http.upstream import Upstream
    from sagellm_cli.gateway.routing.backend import Backend
    from sagellm_cli.gateway.routing.registry import ModelGroup, Registry

log = logging.getLogger("sagellm.gateway")
# Every room decision with its scores and queues (INFO; benchmarks/multi_model.py --decisions).
decisions = logging.getLogger("sagellm.gateway.scheduler")

# vLLM's /sleep and /wake_up move weights between host and GPU: allow them time.
SLEEP_TIMEOUT_S = 120.0
# What a sleeping vLLM engine keeps on each GPU, for the ledger (NVML's real figure counts
# where larger). Measured on an H200: 19.7 GiB awake, 1.3 GiB for the whole GPU asleep.
ASLEEP_GIB = 1.0
# "Needed recently", for the cost of unloading an engine: requests within this window,
# each weighted 2^(-age / USES_HALF_LIFE_S) (a burst a minute ago counts half).
RECENT_S = 300.0
USES_HALF_LIFE_S = 60.0
# How often a request waiting for room looks again (an unload ended, a request finished).
ROOM_POLL_S = 0.05
GIB = 1024**3


class WakeFailed(Exception):
    """An unloaded model could not be loaded for a request (the proxy answers 503).

    `code` is the error body's: `model_loading` (try again later) or
    `model_does_not_fit` (it cannot load beside the engines that may not be unloaded)."""

    def __init__(self, message: str, code: str = "model_loading"):
        super().__init__(message)
        self.code = code


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
        # The scheduler's inputs that only this process sees (lost with it, and measured
        # again: a state-file write per request would cost more than a re-measure).
        self._queued: dict[str, int] = {}  # engine id -> requests waiting for its wake
        self._wake_s: dict[str, float] = {}  # last sleep -> ready, seconds
        self._cold_s: dict[str, float] = {}  # last idle -> ready, seconds
        self._sleep_levels: dict[str, int] = {}  # the level each sleeping engine slept at
        self._uses: dict[str, deque[tuple[float, int]]] = {}  # (time, requests) samples
        self._counted: dict[str, int] = {}  # Backend.requests at the last sample
        self._woken_at: dict[str, float] = {}  # monotonic time this gateway last loaded it
        self._decided: dict[str, str] = {}  # engine id -> its last logged room decision
        self._short: set[str] = set()  # engines whose load waits for room now
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
            self._sample_uses(backend, now)
            spec = backend.record.spec
            if (
                not spec.pinned
                and not self._leased_s(backend.record)
                and backend.inflight == 0
                and not self._queued.get(backend.id)
                and now - backend.last_used >= spec.keep_alive
            ):
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
            "eviction": self.config.eviction,
            "queued": {engine: n for engine, n in self._queued.items() if n},
            "wake_s": {engine: round(s, 3) for engine, s in self._wake_s.items()},
            "cold_start_s": {engine: round(s, 3) for engine, s in self._cold_s.items()},
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
        while backend.inflight:
            # Drained by the scheduler with its burst still running: those requests finish
            # (vLLM would abort them); new ones queue for the engine meanwhile.
            await asyncio.sleep(ROOM_POLL_S)
        if record.spec.unload == "sleep":
            level = await asyncio.to_thread(_sleep_level, record)
            status = await self.upstream.post_status(
                f"{backend.url}{ENGINE_SLEEP}?level={level}", b"", SLEEP_TIMEOUT_S
            )
            if status != 200:
                backend.draining = False
                self.registry.mark_success(backend)
                raise WakeFailed(f"{ENGINE_SLEEP} answered {status}")
            if not await asyncio.to_thread(self.manager.mark_asleep, record.id, ASLEEP_GIB):
                return  # stopped or crashed meanwhile: it stays so (logged by the table)
            self._sleep_levels[record.id] = level
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

        The request waits in the engine's queue meanwhile (its reference count: nothing
        unloads an engine with queued requests). Requests share one wake per engine.
        Raises WakeFailed after `--wake-timeout`, or at once when it cannot succeed (the
        preflight: no room even after every allowed unload).
        """
        # An engine being unloaded counts: its request waits for the unload, then wakes it.
        unloading = {e for e, (action, _) in self._actions.items() if action == "unload"}
        candidates = [b for b in group.backends if b.wakeable or b.id in unloading]
        if not candidates:
            if any(b.record.status in LOADING for b in group.backends):
                await self._wait_loaded(group)  # started, not ready yet: wait in line
            return self.registry.group(group.kind, group.name) or group
        # A sleeping engine wakes fastest; then the most recently used.
        backend = min(candidates, key=lambda b: (b.record.status != Status.SLEEPING, -b.last_used))
        self._queued[backend.id] = self._queued.get(backend.id, 0) + 1
        try:
            await asyncio.wait_for(self._shared_wake(backend), self.config.wake_timeout_s)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            raise WakeFailed(
                f"model {group.name!r} is still loading after {self.config.wake_timeout_s:.0f}s"
            ) from None
        finally:
            self._queued[backend.id] -= 1
            # Counted as used now: the request is about to reach it.
            fresh = self.registry.backends.get(backend.id)
            if fresh is not None:
                fresh.last_used = time.monotonic()
        fresh = self.registry.group(group.kind, group.name)
        return fresh if fresh is not None else group

    async def _wait_loaded(self, group: ModelGroup) -> None:
        deadline = time.monotonic() + self.config.wake_timeout_s
        while True:
            await self.registry.refresh()
            fresh = self.registry.group(group.kind, group.name)
            if fresh is None or fresh.healthy:
                return
            if not any(b.record.status in LOADING for b in fresh.backends):
                return  # it failed or stopped: the proxy answers as for any unhealthy model
            if time.monotonic() > deadline:
                raise WakeFailed(
                    f"model {group.name!r} is still loading after {self.config.wake_timeout_s:.0f}s"
                )
            await asyncio.sleep(ROOM_POLL_S * 4)

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
            # The load itself, not the wait for room: a model that waited long for memory
            # must not look expensive to reload (it would be kept over the planner).
            self._cold_s[engine_id] = await self._with_room(
                record, lambda: self.manager.wake(engine_id, timeout=self.config.wake_timeout_s)
            )
        else:
            return
        self._woken_at[engine_id] = time.monotonic()
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
        began = time.monotonic()
        try:
            status = await self.upstream.post_status(
                f"{record.url}{ENGINE_WAKE}", b"", self.config.wake_timeout_s
            )
            if status == 200 and self._sleep_levels.get(engine_id) == 2:
                # Level 2 dropped the weights: vLLM reloads them from disk on request.
                status = await self.upstream.post_status(
                    f"{record.url}/collective_rpc", b'{"method": "reload_weights"}',
                    self.config.wake_timeout_s,
                )  # fmt: skip
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
        self._wake_s[engine_id] = time.monotonic() - began
        self._sleep_levels.pop(engine_id, None)
        return True

    async def _awake_elsewhere(self, engine_id: str) -> bool:
        """After a refused wake step: False if the engine is READY (another gateway woke
        it), else WakeFailed naming what it became."""
        record = (await asyncio.to_thread(self.manager.store.read)).engines.get(engine_id)
        if record is not None and record.status == Status.READY:
            return False
        now = record.status if record is not None else "removed"
        raise WakeFailed(f"engine {engine_id} was {now} while waking; not woken")

    async def _with_room(self, record: EngineRecord, load: Callable[[], object]) -> float:
        """Run `load` in a thread; while GPU memory is short, unload the engine the
        scheduler chooses (`--eviction`, core/engines/scheduler.py `decide`) and try again.
        Returns the seconds the successful `load` took.

        Under `cost` the load may wait: for its target's burst or minimum residency, or,
        when no engine may be unloaded yet, for their requests to end; unless the
        preflight says the model can never fit: then WakeFailed at once, naming the
        holders. Each new decision is logged with the scores (logger of this module)."""
        began = time.monotonic()
        try:
            while True:
                attempt = time.monotonic()
                try:
                    await asyncio.to_thread(load)
                    return time.monotonic() - attempt
                except ResourceUnavailable as exc:
                    self._short.add(record.id)
                    now = time.monotonic()
                    decision = self._decide(record, now, now - began)
                    victim = decision.victim
                    if victim is not None:
                        backend = self.registry.backends.get(victim.id)
                        if backend is not None:
                            log.warning(
                                "unloading engine %s to make room for %s", victim.id, record.id
                            )
                            await self._start(
                                victim.id, "unload", lambda b=backend: self._unload(b)
                            )
                            continue
                    unloading = [t for a, t in self._actions.values() if a == "unload"]
                    if unloading:
                        # Memory is on its way back: wait for those unloads, then try again.
                        await asyncio.wait(unloading)
                        continue
                    if self.config.eviction == "lru":
                        raise WakeFailed(
                            f"cannot load model {record.served_model_name!r}: {exc.message}; "
                            "no idle engine (keep_alive set) to unload"
                        ) from None
                    verdict = await asyncio.to_thread(self._preflight, record, now)
                    if not verdict.fits:
                        raise WakeFailed(verdict.reason, code="model_does_not_fit") from None
                    await asyncio.sleep(ROOM_POLL_S)  # a burst, a residency or requests run
        finally:
            self._decided.pop(record.id, None)
            self._short.discard(record.id)

    def _decide(self, record: EngineRecord, now: float, waited: float) -> scheduler.Decision:
        """The scheduler's decision for `record`'s load, logged when it changes."""
        pairs = self._candidates(record.id, now)
        decision = scheduler.decide((v for _, v in pairs), self.config.eviction, waited)
        victim = decision.victim
        summary = f"unload {victim.name}" if victim is not None else decision.reason
        # Logged when what it does or waits for changes, not at every poll.
        hold = decision.ranked[0][2] if decision.ranked else ""
        key = f"{victim is not None} {decision.target} {re.sub(r'[0-9.]+', '', hold)}"
        if self._decided.get(record.id) != key:
            self._decided[record.id] = key
            scores = ", ".join(f"{n}={v:g} ({hold})" for n, v, hold in decision.ranked)
            queued = {e: n for e, n in self._queued.items() if n}
            decisions.info(
                "room for %s after %.2fs (%s): %s%s; keep values: %s; queued: %s",
                record.label or record.id, waited, self.config.eviction, summary,
                f" ({decision.reason})" if victim is not None else "",
                scores or "-", queued or "-",
            )  # fmt: skip
        return decision

    # -- the scheduler's view ------------------------------------------------

    def _leased_s(self, record: EngineRecord) -> float:
        return max((record.held_until or 0.0) - time.time(), 0.0)

    def _sample_uses(self, backend: Backend, now: float) -> float:
        """Requests to `backend` within RECENT_S, each weighted by its age (half-life
        USES_HALF_LIFE_S; sampled from its request counter), plus the queued ones."""
        samples = self._uses.setdefault(backend.id, deque())
        seen = self._counted.get(backend.id, 0)
        fresh = backend.requests - seen if backend.requests >= seen else backend.requests
        self._counted[backend.id] = backend.requests
        if fresh:
            samples.append((now, fresh))
        while samples and now - samples[0][0] > RECENT_S:
            samples.popleft()
        decayed = sum(n * 0.5 ** ((now - t) / USES_HALF_LIFE_S) for t, n in samples)
        return decayed + self._queued.get(backend.id, 0)

    def _loaded(self, backend: Backend, now: float) -> scheduler.Loaded:
        record = backend.record
        spec = record.spec
        lru = self.config.eviction == "lru"
        full = record.gpu_memory_gb or 0.0
        ready = record.status == Status.READY
        # A load under way that is not waiting for room (two loads waiting for each other
        # would wait forever). The registry's record may not show WAKING yet.
        action = self._actions.get(backend.id, ("", None))[0]
        waking = not lru and action == "wake" and not ready and backend.id not in self._short
        awake = ready or waking
        frees = (full - ASLEEP_GIB if spec.unload == "sleep" else full) if awake else 0.0
        cold = self._cold_s.get(backend.id)
        if cold is None and record.ready_at and record.started_at:
            cold = record.ready_at - record.started_at
        return scheduler.Loaded(
            id=backend.id,
            name=record.label or backend.id,
            gpus=tuple(record.gpus),
            frees_gib=max(frees, 0.0),
            held_gib=full if ready else ASLEEP_GIB,
            # The old LRU policy knew only in-flight requests and keep_alive (the baseline).
            refs=backend.inflight + (0 if lru else self._queued.get(backend.id, 0)),
            pinned=spec.keep_alive < 0 if lru else spec.pinned,
            leased_s=0.0 if lru else self._leased_s(record),
            busy=backend.id in self._actions,
            ready=ready,
            waking=waking,
            idle_s=now - backend.last_used,
            reload_s=scheduler.reload_cost(spec.unload, self._wake(backend.id), cold),
            recent_uses=self._sample_uses(backend, now),
            resident_s=now - self._woken_at.get(backend.id, float("-inf")),
        )

    def _wake(self, engine_id: str) -> float | None:
        """Its measured wake, else the mean of the others' (an engine never woken by this
        gateway must not look dearer, or cheaper, to reload than its measured peers)."""
        if engine_id in self._wake_s:
            return self._wake_s[engine_id]
        return sum(self._wake_s.values()) / len(self._wake_s) if self._wake_s else None

    def _candidates(self, engine_id: str, now: float) -> list[tuple[Backend, scheduler.Loaded]]:
        return [
            (b, self._loaded(b, now))
            for b in self.registry.backends.values()
            if b.id != engine_id and b.record.gpus
        ]

    def _preflight(self, record: EngineRecord, now: float) -> scheduler.Verdict:
        """The ledger's answer to "can `record` load at all?" (reads NVML: in a thread)."""
        from sagellm_cli.core.gpu import capacities, engine_pid_map, read_inventory

        state = self.manager.store.read()
        caps = capacities(read_inventory(engine_pid_map(state)), state.reservations.values())
        free = {c.index: c.free_gib for c in caps if c.usable}
        own = state.reservations.get(record.id)
        if own is not None:  # asleep: the rest of its own reservation, on its own GPUs
            need, count = own.gib_per_gpu - own.held_gib, len(own.gpus)
            free = {i: free[i] for i in own.gpus if i in free}
        elif record.spec.gpu_memory_gb:
            need = record.spec.gpu_memory_gb
            count = record.spec.tensor_parallel * record.spec.pipeline_parallel
        else:
            return scheduler.Verdict(True)  # its size is unknown until placed: wait
        loaded = [v for _, v in self._candidates(record.id, now)]
        return scheduler.preflight(record.label or record.id, need, count, free, loaded)


def _sleep_level(record: EngineRecord) -> int:
    """Level 1 if host RAM can hold the engine's weights, else 2 (core/engines/scheduler.py)."""
    import psutil

    from sagellm_cli.core.gpu.estimate import read_weights

    try:
        weights = read_weights(record.model, record.kind).checkpoint_bytes
    except Exception:  # noqa: BLE001 - unreadable model dir: vLLM's default level
        weights = None
    free = psutil.virtual_memory().available / GIB
    return scheduler.sleep_level(free, weights / GIB if weights else None)
