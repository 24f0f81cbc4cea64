"""Admission control and request scheduling, in front of engine selection.

The proxy awaits `Scheduler.admit()` after the request is parsed and its model
group is known; `release()` runs when the request ends, however it ends. With
no scheduler (`--scheduling none`, the default) the proxy skips both, so the
hot path pays nothing.

`AdmissionScheduler` (`--scheduling fifo|priority|slo_aware|cost|adaptive`):

- **Admission.** Each engine takes at most `limit` requests at once: its
  `record.spec["max_inflight"]` (preset or engine metadata), else
  `--max-inflight-per-engine` (0 = no limit). `admit` reserves a slot on one
  engine, picked by the model's routing strategy among the suitable engines that
  have room, and hands it to the proxy in `ticket.backend` for the first attempt.
  (A retry after a failure may exceed the limit briefly: failing fast beats waiting.)
- **Queue.** When no suitable engine has room, the request waits in its model's
  queue, ordered by the active policy (`policies.order_key`). A release hands the
  freed slot straight to the next waiter (reserved before it wakes, so a new
  arrival cannot barge in). "Suitable" is every healthy replica, except under
  `length` routing, where a long prompt waits for a `prefill` engine and a short
  one for a `decode` engine rather than spilling over.
- **Limits.** `--max-queue` (per model) -> 429 with `Retry-After`;
  `--queue-timeout` -> 503 with `Retry-After`; `--slo-reject` -> 429 when the
  request's deadline can no longer be met, judged on arrival (estimated wait +
  service) and again when its turn comes (service estimate only). The service
  estimate is an exponentially weighted mean of recent admitted-to-released times
  for the model; until 3 requests have finished nothing is rejected.
- **Metrics** (on the gateway's registry): queue depth, wait-time histogram by
  priority class, decisions by policy and outcome, adaptive switches.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from sagellm_cli.gateway.policies import (
    DEFAULT_CLASS,
    POLICIES,
    PRIORITY_CLASSES,
    PRIORITY_RANK,
    adaptive_choice,
    cheapest,
    costs_differ,
    deadline_ms,
    order_key,
    priority_class,
)
from sagellm_cli.gateway.routing import Length

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from sagellm_cli.gateway.config import GatewayConfig
    from sagellm_cli.gateway.registry import Backend, ModelGroup, Registry
    from sagellm_cli.gateway.routing import RouteInfo

log = logging.getLogger("sagellm.gateway")

# Body fields that belong to the gateway, not the engine (vLLM's `priority` is an int).
BODY_PRIORITY = "priority"
BODY_DEADLINE = "slo_deadline_ms"
_H_PRIORITY = b"x-priority"
_H_DEADLINE = b"x-slo-deadline-ms"

# Dispatch is event-driven (releases); this tick only catches health and engine-table
# changes while requests wait, and ends when nothing waits.
_TICK_S = 0.25
# adaptive: the least time between two switches (no flapping on every request).
ADAPTIVE_DWELL_S = 1.0
_EWMA_ALPHA = 0.2
_MIN_SAMPLES = 3

_WAITING, _ADMITTED, _GONE = 0, 1, 2


class Rejected(Exception):
    """Raised by `admit` to refuse a request with an HTTP status and a message."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.retry_after = retry_after

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Extra response headers (`Retry-After`, whole seconds, at least 1)."""
        if self.retry_after is None:
            return []
        return [(b"retry-after", str(max(1, math.ceil(self.retry_after))).encode())]


class Scheduler(Protocol):
    """Admission control in front of engine selection."""

    async def admit(
        self,
        group: ModelGroup,
        body: dict[str, Any],
        info: RouteInfo,
        headers: Iterable[tuple[bytes, bytes]] = (),
        receive: Callable | None = None,
    ) -> Any:
        """Wait until the request may proceed (or raise Rejected); return a ticket.

        A ticket with a `backend` attribute that is not None names the engine the
        first attempt must use (its slot is reserved).
        """
        ...

    def release(self, ticket: Any) -> None:
        """The request admitted with `ticket` finished."""
        ...


def strip_gateway_fields(body: dict[str, Any]) -> bool:
    """Drop the gateway-only body fields before forwarding; True if the body changed.

    A string `priority` is ours (critical|high|normal|low): vLLM's own `priority`
    is an integer and rejects strings, so strings are removed and integers pass
    through untouched. `slo_deadline_ms` is always ours.
    """
    changed = False
    if isinstance(body.get(BODY_PRIORITY), str):
        del body[BODY_PRIORITY]
        changed = True
    if BODY_DEADLINE in body:
        del body[BODY_DEADLINE]
        changed = True
    return changed


class Ticket:
    """One request as the scheduler tracks it, from arrival to release."""

    __slots__ = (
        "seq",
        "qkey",
        "model",
        "cls",
        "rank",
        "deadline",
        "arrival",
        "info",
        "backend",
        "dispatched",
        "future",
        "state",
    )

    def __init__(self, seq, qkey, model, cls, deadline, arrival, info):
        self.seq = seq
        self.qkey = qkey
        self.model = model
        self.cls = cls
        self.rank = PRIORITY_RANK[cls]
        self.deadline = deadline  # absolute, on the scheduler's clock; None = no SLO
        self.arrival = arrival
        self.info = info
        self.backend: Backend | None = None
        self.dispatched = 0.0
        self.future: asyncio.Future | None = None
        self.state = _WAITING


class _Queue:
    """The waiting requests of one model (kind, name), as a heap on the active order."""

    __slots__ = ("key", "group", "heap", "live")

    def __init__(self, key: tuple[str, str], group: ModelGroup):
        self.key = key
        self.group = group
        self.heap: list[tuple[tuple, Ticket]] = []
        self.live = 0


class AdmissionScheduler:
    """Per-engine in-flight limits, a per-model queue, and the policy that orders it."""

    def __init__(
        self,
        config: GatewayConfig,
        registry: Registry | None = None,
        metrics_registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        policy = config.scheduling
        if policy not in POLICIES:
            raise ValueError(f"unknown scheduling policy {policy!r}")
        self.policy = policy
        self.active = "fifo" if policy == "adaptive" else policy
        self.registry = registry
        self.default_limit = max(0, int(config.max_inflight_per_engine))
        self.max_queue = max(0, int(config.max_queue))
        self.queue_timeout = float(config.queue_timeout_s or 0.0)
        self.slo_reject = bool(config.slo_reject)
        self.clock = clock
        self._load: dict[str, int] = {}
        self._queues: dict[tuple[str, str], _Queue] = {}
        self._waiting = 0
        self._class_waiting = [0] * len(PRIORITY_CLASSES)
        self._deadline_waiting = 0
        self._seq = 0
        self._service: dict[tuple[str, str], list[float]] = {}  # key -> [ewma_s, samples]
        self._switched_at = -math.inf
        self.switches = 0
        self._ticker: asyncio.Task | None = None
        self.metrics = _SchedulerMetrics(metrics_registry, self) if metrics_registry else None

    # -- per-engine accounting ----------------------------------------------------

    def limit(self, backend: Backend) -> int:
        """The engine's in-flight limit (0 = none): its spec's `max_inflight`, else the default."""
        spec = backend.record.spec
        value = spec.get("max_inflight") if spec else None
        if value:
            try:
                return max(1, int(value))
            except (TypeError, ValueError):
                pass
        return self.default_limit

    def load(self, backend: Backend) -> int:
        """Requests admitted to `backend` and not yet released."""
        return self._load.get(backend.id, 0)

    def _has_room(self, backend: Backend) -> bool:
        limit = self.limit(backend)
        return not limit or self._load.get(backend.id, 0) < limit

    def _suitable(self, group: ModelGroup, info: RouteInfo) -> list[Backend]:
        healthy = group.healthy
        strategy = group.strategy
        if isinstance(strategy, Length) and len(healthy) > 1:
            # A long prompt waits for a prefill engine (and a short one for a decode
            # engine) instead of spilling onto the other role when its own is full.
            text = info.prompt_text(strategy.threshold + 1)
            role = "prefill" if len(text) > strategy.threshold else "decode"
            return [b for b in healthy if b.role == role] or healthy
        return healthy

    def _place(self, group: ModelGroup, info: RouteInfo) -> Backend | None:
        """The engine that takes the request now (via the routing strategy), or None if full."""
        pool = self._suitable(group, info)
        room = [b for b in pool if self._has_room(b)]
        if not room:
            return None
        if self.active == "cost":
            room = cheapest(room)
        return room[0] if len(room) == 1 else group.strategy.choose(room, info)

    def _reserve(self, ticket: Ticket, backend: Backend, now: float) -> None:
        self._load[backend.id] = self._load.get(backend.id, 0) + 1
        ticket.backend = backend
        ticket.dispatched = now
        ticket.state = _ADMITTED

    def _capacity(self, pool: list[Backend]) -> int:
        """Slots over `pool`; 0 when any engine is unlimited (no queueing there)."""
        total = 0
        for backend in pool:
            limit = self.limit(backend)
            if not limit:
                return 0
            total += limit
        return total

    def service_estimate(self, qkey: tuple[str, str]) -> float | None:
        """Mean admitted-to-released seconds of recent requests of a model (None: too few)."""
        entry = self._service.get(qkey)
        if entry is None or entry[1] < _MIN_SAMPLES:
            return None
        return entry[0]

    def utilization(self) -> float:
        """Share of the limited engines' slots in use (0 when no engine is limited)."""
        if self.registry is None:
            return 0.0
        used = slots = 0
        for backend in self.registry.backends.values():
            limit = self.limit(backend)
            if limit and backend.healthy:
                slots += limit
                used += self._load.get(backend.id, 0)
        return used / slots if slots else 0.0

    # -- admission ----------------------------------------------------------------

    def _classify(self, body: dict[str, Any], headers) -> tuple[str, float | None]:
        cls = None
        rel_ms = None
        for name, value in headers:
            if name == _H_PRIORITY:
                cls = priority_class(value)
            elif name == _H_DEADLINE:
                rel_ms = deadline_ms(value)
        if cls is None:
            cls = priority_class(body.get(BODY_PRIORITY)) or DEFAULT_CLASS
        if rel_ms is None and BODY_DEADLINE in body:
            rel_ms = deadline_ms(body.get(BODY_DEADLINE))
        return cls, rel_ms

    async def admit(
        self,
        group: ModelGroup,
        body: dict[str, Any],
        info: RouteInfo,
        headers: Iterable[tuple[bytes, bytes]] = (),
        receive: Callable | None = None,
    ) -> Ticket:
        """Reserve a slot now, or queue until one frees (see the module docstring)."""
        now = self.clock()
        cls, rel_ms = self._classify(body, headers)
        self._seq += 1
        qkey = (group.kind, group.name)
        model = group.backends[0].served_model_name if group.backends else group.name
        deadline = now + rel_ms / 1000.0 if rel_ms is not None else None
        ticket = Ticket(self._seq, qkey, model, cls, deadline, now, info)
        queue = self._queues.get(qkey)
        if self.policy == "adaptive" and (queue is None or not queue.live):
            self._adapt(now)  # (a request that will queue is judged once it is queued)
        if not group.healthy:
            # No engine to wait for: the proxy answers 503 no_ready_engine at once.
            self._decide(ticket, "no_engine")
            ticket.state = _ADMITTED
            return ticket
        if queue is None or not queue.live:
            backend = self._place(group, info)
            if backend is not None:
                if self.slo_reject and deadline is not None:
                    self._check_deadline(ticket, now, 0.0)
                self._reserve(ticket, backend, now)
                self._decide(ticket, "admitted", wait=0.0)
                return ticket
        # Every suitable engine is at its limit (or others already wait): queue.
        if queue is None:
            queue = self._queues[qkey] = _Queue(qkey, group)
        queue.group = group
        if self.max_queue and queue.live >= self.max_queue:
            self._decide(ticket, "rejected_queue_full")
            raise Rejected(
                429,
                f"the queue for model {model!r} is full ({queue.live} waiting, --max-queue "
                f"{self.max_queue}); retry later",
                code="queue_full",
                retry_after=self._drain_estimate(queue, queue.live),
            )
        if self.slo_reject and deadline is not None:
            service = self.service_estimate(qkey)
            capacity = self._capacity(self._suitable(group, info))
            if service is not None and capacity:
                wait = (self._ahead(queue, ticket) + 1) * service / capacity
                self._check_deadline(ticket, now, wait)
        loop = asyncio.get_running_loop()
        ticket.future = loop.create_future()
        self._enqueue(queue, ticket)
        self._dispatch_queue(queue)
        if ticket.state == _WAITING and (self._ticker is None or self._ticker.done()):
            self._ticker = loop.create_task(self._tick())
        return await self._wait(queue, ticket, receive)

    async def _wait(self, queue: _Queue, ticket: Ticket, receive) -> Ticket:
        future = ticket.future
        watcher = asyncio.ensure_future(_disconnected(receive)) if receive is not None else None
        timeout = self.queue_timeout or None
        try:
            if not future.done():
                waits = {future} if watcher is None else {future, watcher}
                await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            # Cancelled (the server shuts down): give back whatever was reserved.
            self._abandon(queue, ticket)
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
        if future.done():
            future.result()  # raises the Rejected set at dispatch (deadline)
            return ticket
        gone = watcher is not None and watcher.done()
        self._abandon(queue, ticket)
        if gone:
            self._decide(ticket, "cancelled")
            raise Rejected(499, "the client went away while queued", code="client_closed")
        self._decide(ticket, "timeout")
        raise Rejected(
            503,
            f"waited {self.queue_timeout:g}s in the queue for model {ticket.model!r} "
            "(--queue-timeout); the engines are saturated, retry later",
            code="queue_timeout",
            retry_after=self._drain_estimate(queue, queue.live),
        )

    def _abandon(self, queue: _Queue, ticket: Ticket) -> None:
        future = ticket.future
        if future is not None and future.done() and not future.cancelled():
            future.exception()  # retrieved: no "exception was never retrieved" warning
        if ticket.state == _WAITING:
            self._leave(queue, ticket)
            ticket.state = _GONE
        elif ticket.state == _ADMITTED and ticket.backend is not None:
            self.release(ticket)

    def release(self, ticket: Ticket | None) -> None:
        """The request finished: free its slot and hand it to the next waiter."""
        if ticket is None or ticket.state != _ADMITTED:
            return
        ticket.state = _GONE
        backend = ticket.backend
        if backend is None:
            return
        left = self._load.get(backend.id, 1) - 1
        if left > 0:
            self._load[backend.id] = left
        else:
            self._load.pop(backend.id, None)
        took = self.clock() - ticket.dispatched
        entry = self._service.get(ticket.qkey)
        if entry is None:
            self._service[ticket.qkey] = [took, 1]
        else:
            entry[0] += _EWMA_ALPHA * (took - entry[0])
            entry[1] += 1
        if self._waiting:
            self._dispatch()

    # -- the queue ----------------------------------------------------------------

    def _key(self, ticket: Ticket) -> tuple:
        return order_key(self.active, ticket.seq, ticket.rank, ticket.deadline)

    def _enqueue(self, queue: _Queue, ticket: Ticket) -> None:
        heapq.heappush(queue.heap, (self._key(ticket), ticket))
        queue.live += 1
        self._waiting += 1
        self._class_waiting[ticket.rank] += 1
        if ticket.deadline is not None:
            self._deadline_waiting += 1
        if self.policy == "adaptive":
            self._adapt(self.clock())

    def _leave(self, queue: _Queue, ticket: Ticket) -> None:
        """Bookkeeping for a ticket leaving the waiting state (its heap entry is skipped later)."""
        queue.live -= 1
        self._waiting -= 1
        self._class_waiting[ticket.rank] -= 1
        if ticket.deadline is not None:
            self._deadline_waiting -= 1

    def _ahead(self, queue: _Queue, ticket: Ticket) -> int:
        key = self._key(ticket)
        return sum(1 for k, t in queue.heap if t.state == _WAITING and k < key)

    def _drain_estimate(self, queue: _Queue, ahead: int) -> float:
        """Seconds until `ahead` waiters are served, at the engines' current pace."""
        service = self.service_estimate(queue.key) or 1.0
        capacity = self._capacity(queue.group.healthy) or 1
        return (ahead + 1) * service / capacity

    def _check_deadline(self, ticket: Ticket, now: float, wait: float) -> None:
        """Raise 429 if `wait` plus the service estimate overshoots the ticket's deadline."""
        service = self.service_estimate(ticket.qkey)
        if service is None or now + wait + service <= ticket.deadline:
            return
        self._decide(ticket, "rejected_deadline")
        raise Rejected(
            429,
            f"the request's SLO deadline cannot be met: about {(wait + service) * 1000:.0f} ms "
            f"needed, {max(0.0, ticket.deadline - now) * 1000:.0f} ms left (--slo-reject)",
            code="deadline_unmeetable",
            retry_after=wait + service,
        )

    def _group_now(self, queue: _Queue) -> ModelGroup:
        """The model's current group (the engine table may have been re-read meanwhile)."""
        if self.registry is not None:
            group = self.registry.group(*queue.key)
            if group is not None:
                queue.group = group
        return queue.group

    def _dispatch(self) -> None:
        for queue in list(self._queues.values()):
            if queue.live:
                self._dispatch_queue(queue)
            elif queue.heap:
                queue.heap.clear()  # only dead entries remain

    def _dispatch_queue(self, queue: _Queue) -> None:
        """Hand free slots to waiters in policy order."""
        group = self._group_now(queue)
        now = self.clock()
        if not group.healthy:
            # Nothing left to wait for: let the proxy answer 503 no_ready_engine now.
            while queue.heap:
                _, ticket = heapq.heappop(queue.heap)
                if ticket.state == _WAITING:
                    self._leave(queue, ticket)
                    ticket.state = _ADMITTED
                    self._decide(ticket, "no_engine")
                    ticket.future.set_result(None)
            return
        role_split = isinstance(group.strategy, Length)
        blocked: list[tuple[tuple, Ticket]] = []
        while queue.heap:
            entry = queue.heap[0]
            ticket = entry[1]
            if ticket.state != _WAITING:
                heapq.heappop(queue.heap)
                continue
            if self.slo_reject and ticket.deadline is not None:
                service = self.service_estimate(ticket.qkey)
                if service is not None and now + service > ticket.deadline:
                    heapq.heappop(queue.heap)
                    self._leave(queue, ticket)
                    ticket.state = _GONE
                    self._decide(ticket, "rejected_deadline")
                    ticket.future.set_exception(
                        Rejected(
                            429,
                            "the request's SLO deadline passed while it was queued "
                            f"(about {service * 1000:.0f} ms of service needed, "
                            f"{max(0.0, ticket.deadline - now) * 1000:.0f} ms left; --slo-reject)",
                            code="deadline_unmeetable",
                            retry_after=service,
                        )
                    )
                    continue
            backend = self._place(group, ticket.info)
            if backend is None:
                if not role_split:
                    break  # every waiter wants the same engines: none can go now
                blocked.append(heapq.heappop(queue.heap))
                continue
            heapq.heappop(queue.heap)
            self._leave(queue, ticket)
            self._reserve(ticket, backend, now)
            self._decide(ticket, "queued", wait=now - ticket.arrival)
            ticket.future.set_result(None)
        for entry in blocked:
            heapq.heappush(queue.heap, entry)

    async def _tick(self) -> None:
        while self._waiting:
            await asyncio.sleep(_TICK_S)
            try:
                self._dispatch()
                if self.policy == "adaptive":
                    self._adapt(self.clock())
            except Exception:  # noqa: BLE001 - a bug here must not strand the queue silently
                log.exception("scheduler dispatch failed")

    # -- adaptive -----------------------------------------------------------------

    def _adapt(self, now: float) -> None:
        if now - self._switched_at < ADAPTIVE_DWELL_S:
            return
        target, reason = adaptive_choice(
            self.active,
            waiting=self._waiting,
            classes=lambda: sum(1 for n in self._class_waiting if n),
            with_deadline=self._deadline_waiting,
            utilization=self.utilization(),
            costs_vary=self._costs_vary,
        )
        if target == self.active:
            return
        log.info("scheduling: adaptive switched %s -> %s (%s)", self.active, target, reason)
        if self.metrics is not None:
            self.metrics.switched(self.active, target)
        self.active = target
        self._switched_at = now
        self.switches += 1
        for queue in self._queues.values():
            queue.heap = [(self._key(t), t) for _, t in queue.heap if t.state == _WAITING]
            heapq.heapify(queue.heap)

    def _costs_vary(self) -> bool:
        if self.registry is None:
            return False
        return costs_differ([b for b in self.registry.backends.values() if b.healthy])

    # -- reporting ----------------------------------------------------------------

    def _decide(self, ticket: Ticket, outcome: str, wait: float | None = None) -> None:
        if self.metrics is not None:
            self.metrics.decided(ticket, self.active, outcome, wait)

    def queue_depths(self) -> dict[str, int]:
        """Waiting requests per model name."""
        return {name: q.live for (_, name), q in self._queues.items() if q.live}

    def status(self) -> dict[str, Any]:
        """For the management status document."""
        return {
            "policy": self.policy,
            "active_policy": self.active,
            "switches": self.switches,
            "waiting": self._waiting,
            "queues": self.queue_depths(),
            "engine_load": dict(self._load),
            "max_queue": self.max_queue,
            "queue_timeout_s": self.queue_timeout,
            "max_inflight_per_engine": self.default_limit,
            "slo_reject": self.slo_reject,
        }


async def _disconnected(receive) -> None:
    """Return when the client disconnects (its body was read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def make_scheduler(
    config: GatewayConfig,
    registry: Registry | None = None,
    metrics_registry: CollectorRegistry | None = None,
) -> AdmissionScheduler | None:
    """The scheduler for `config.scheduling`, or None for "none" (no admission control)."""
    if not config.scheduling or config.scheduling == "none":
        return None
    return AdmissionScheduler(config, registry, metrics_registry)


_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _SchedulerMetrics:
    """Queue depth (read at scrape time), wait times, decisions and adaptive switches."""

    def __init__(self, registry: CollectorRegistry, scheduler: AdmissionScheduler):
        from prometheus_client import Counter, Histogram

        self.wait = Histogram(
            "sagellm_gateway_queue_wait_seconds",
            "Time from arrival to admission, per model and priority class (0 when not queued).",
            ["model", "priority"],
            buckets=_WAIT_BUCKETS,
            registry=registry,
        )
        self.decisions = Counter(
            "sagellm_gateway_scheduler_decisions_total",
            "Admission decisions by policy and outcome (admitted, queued, rejected_queue_full, "
            "rejected_deadline, timeout, cancelled, no_engine).",
            ["model", "policy", "outcome"],
            registry=registry,
        )
        self.switches = Counter(
            "sagellm_gateway_scheduler_policy_switches_total",
            "adaptive: switches between sub-policies.",
            ["from_policy", "to_policy"],
            registry=registry,
        )
        registry.register(_QueueCollector(scheduler))
        self._wait: dict[tuple, Any] = {}
        self._decisions: dict[tuple, Any] = {}

    def decided(self, ticket: Ticket, policy: str, outcome: str, wait: float | None) -> None:
        key = (ticket.model, policy, outcome)
        child = self._decisions.get(key)
        if child is None:
            child = self._decisions[key] = self.decisions.labels(*key)
        child.inc()
        if wait is not None:
            key2 = (ticket.model, ticket.cls)
            hist = self._wait.get(key2)
            if hist is None:
                hist = self._wait[key2] = self.wait.labels(*key2)
            hist.observe(wait)

    def switched(self, old: str, new: str) -> None:
        self.switches.labels(old, new).inc()


class _QueueCollector:
    def __init__(self, scheduler: AdmissionScheduler):
        self.scheduler = scheduler

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        depth = GaugeMetricFamily(
            "sagellm_gateway_queue_depth",
            "Requests waiting in the gateway's queue, per model.",
            labels=["model"],
        )
        for (_, name), queue in list(self.scheduler._queues.items()):
            depth.add_metric([name], queue.live)
        active = GaugeMetricFamily(
            "sagellm_gateway_scheduler_active_policy",
            "1 for the policy in effect (adaptive's current sub-policy).",
            labels=["configured", "policy"],
        )
        active.add_metric([self.scheduler.policy, self.scheduler.active], 1)
        slots = GaugeMetricFamily(
            "sagellm_gateway_scheduler_engine_admitted",
            "Requests admitted to each engine by the scheduler and not yet finished.",
            labels=["engine"],
        )
        for engine, n in list(self.scheduler._load.items()):
            slots.add_metric([engine], n)
        yield depth
        yield active
        yield slots
