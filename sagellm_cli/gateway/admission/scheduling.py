"""Admission control and request scheduling, in front of engine selection.

The proxy awaits `Scheduler.admit()` after the request is parsed and its model
group is known; `release()` runs when the request ends, however it ends. With
no scheduler (`--scheduling none`, the default) the proxy skips both, so the
hot path pays nothing.

`AdmissionScheduler` (`--scheduling fifo|priority|slo_aware|cost|adaptive`):

- **Admission.** Each engine takes at most `limit` requests at once: its
  `record.spec.max_inflight` (preset or engine metadata), else
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
  estimate is `estimator.ServiceEstimator`'s; until 3 requests have finished
  nothing is rejected.
- **Cost budget.** A request's `X-Cost-Budget` (or body `cost_budget`): the most it may
  cost per 1k tokens. Only engines whose `cost_per_1k_tokens` is within it may take it
  (it waits for them rather than spilling onto dearer ones); if no healthy engine of the
  model is within it, 429 `cost_budget_exceeded`. Every policy honours it.
- **adaptive** re-picks the sub-policy via `adaptive.AdaptiveSwitcher`.
- **Metrics** (`metrics.SchedulerMetrics`, on the gateway's registry): queue depth,
  wait-time histogram by priority class, decisions by policy and outcome, adaptive switches.

The request's class and deadline come from `request.classify`.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from sagellm_cli.gateway.admission.adaptive import AdaptiveSwitcher
from sagellm_cli.gateway.admission.estimator import ServiceEstimator
from sagellm_cli.gateway.admission.policies import (
    POLICIES,
    PRIORITY_CLASSES,
    PRIORITY_RANK,
    cheapest,
    costs_differ,
    engine_cost,
    order_key,
)
from sagellm_cli.gateway.http.request import InvalidBudget, classify, cost_budget
from sagellm_cli.gateway.telemetry.metrics import SchedulerMetrics

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from sagellm_cli.gateway.config import GatewayConfig
    from sagellm_cli.gateway.routing.backend import Backend
    from sagellm_cli.gateway.routing.registry import ModelGroup, Registry
    from sagellm_cli.gateway.routing.strategies import RouteInfo
    from sagellm_cli.gateway.telemetry.stats import GatewayStats

log = logging.getLogger("sagellm.gateway")

# Dispatch is event-driven (releases); this tick only catches health and engine-table
# changes while requests wait, and ends when nothing waits.
_TICK_S = 0.25

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

    def status(self) -> dict[str, Any]:
        """The `scheduling` part of the management status document (`policy` at least)."""
        ...


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
        "budget",
    )

    def __init__(
        self,
        seq: int,
        qkey: tuple[str, str],
        model: str,
        cls: str,
        deadline: float | None,
        arrival: float,
        info: RouteInfo,
        budget: float | None = None,
    ):
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
        self.budget = budget  # most cost per 1k tokens; None = any engine


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
        stats: GatewayStats | None = None,
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
        self._budget_waiting = 0
        self._seq = 0
        self._service = ServiceEstimator()
        self._adaptive = AdaptiveSwitcher() if policy == "adaptive" else None
        self._ticker: asyncio.Task | None = None
        self.metrics = SchedulerMetrics(metrics_registry, self) if metrics_registry else None
        self.stats = stats

    @property
    def switches(self) -> int:
        """adaptive: how often the sub-policy changed (0 under any other policy)."""
        return self._adaptive.switches if self._adaptive is not None else 0

    # -- per-engine accounting ----------------------------------------------------

    def limit(self, backend: Backend) -> int:
        """The engine's in-flight limit (0 = none): its spec's `max_inflight`, else the default."""
        return backend.record.spec.max_inflight or self.default_limit

    def load(self, backend: Backend) -> int:
        """Requests admitted to `backend` and not yet released."""
        return self._load.get(backend.id, 0)

    def _has_room(self, backend: Backend) -> bool:
        limit = self.limit(backend)
        return not limit or self._load.get(backend.id, 0) < limit

    def _suitable(
        self, group: ModelGroup, info: RouteInfo, budget: float | None = None
    ) -> list[Backend]:
        # Under `length` a long prompt waits for a prefill engine (and a short one for a
        # decode engine) instead of spilling onto the other role when its own is full.
        # A cost budget likewise waits for the engines within it.
        pool = group.strategy.eligible(group.healthy, info)
        if budget is not None:
            pool = [b for b in pool if engine_cost(b) <= budget]
        return pool

    def _place(
        self, group: ModelGroup, info: RouteInfo, budget: float | None = None
    ) -> Backend | None:
        """The engine that takes the request now (via the routing strategy), or None if full."""
        pool = self._suitable(group, info, budget)
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
        return self._service.estimate(qkey)

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
        cls, rel_ms = classify(body, headers)
        self._seq += 1
        qkey = (group.kind, group.name)
        model = group.backends[0].served_model_name if group.backends else group.name
        deadline = now + rel_ms / 1000.0 if rel_ms is not None else None
        try:
            budget = cost_budget(body, headers)
        except InvalidBudget as exc:
            raise Rejected(400, str(exc), code="invalid_cost_budget") from None
        ticket = Ticket(self._seq, qkey, model, cls, deadline, now, info, budget)
        queue = self._queues.get(qkey)
        if self._adaptive is not None and (queue is None or not queue.live):
            self._adapt(now)  # (a request that will queue is judged once it is queued)
        if not group.healthy:
            # No engine to wait for: the proxy answers 503 no_ready_engine at once.
            self._decide(ticket, "no_engine")
            ticket.state = _ADMITTED
            return ticket
        if budget is not None and not self._suitable(group, info, budget):
            self._decide(ticket, "rejected_cost_budget")
            raise Rejected(429, _over_budget(model, budget, group.healthy),
                           code="cost_budget_exceeded")  # fmt: skip
        if queue is None or not queue.live:
            backend = self._place(group, info, budget)
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
            capacity = self._capacity(self._suitable(group, info, budget))
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
        self._service.observe(ticket.qkey, self.clock() - ticket.dispatched)
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
        if ticket.budget is not None:
            self._budget_waiting += 1
        if self._adaptive is not None:
            self._adapt(self.clock())

    def _leave(self, queue: _Queue, ticket: Ticket) -> None:
        """Bookkeeping for a ticket leaving the waiting state (its heap entry is skipped later)."""
        queue.live -= 1
        self._waiting -= 1
        self._class_waiting[ticket.rank] -= 1
        if ticket.deadline is not None:
            self._deadline_waiting -= 1
        if ticket.budget is not None:
            self._budget_waiting -= 1

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
        # Waiters may want different engines (`length`, cost budgets): a blocked one must not
        # hold back the rest.
        role_split = group.strategy.eligible_varies or self._budget_waiting > 0
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
            if ticket.budget is not None and not self._suitable(group, ticket.info, ticket.budget):
                # The engines within its budget left rotation while it waited.
                heapq.heappop(queue.heap)
                self._leave(queue, ticket)
                ticket.state = _GONE
                self._decide(ticket, "rejected_cost_budget")
                ticket.future.set_exception(
                    Rejected(
                        429,
                        _over_budget(ticket.model, ticket.budget, group.healthy),
                        code="cost_budget_exceeded",
                    )
                )
                continue
            backend = self._place(group, ticket.info, ticket.budget)
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
                if self._adaptive is not None:
                    self._adapt(self.clock())
            except Exception:  # noqa: BLE001 - a bug here must not strand the queue silently
                log.exception("scheduler dispatch failed")

    # -- adaptive -----------------------------------------------------------------

    def _adapt(self, now: float) -> None:
        switcher = self._adaptive
        if switcher is None:
            return
        target = switcher.decide(
            self.active,
            now,
            waiting=self._waiting,
            class_waiting=self._class_waiting,
            with_deadline=self._deadline_waiting,
            utilization=self.utilization,
            costs_vary=self._costs_vary,
        )
        if target is None:
            return
        if self.metrics is not None:
            self.metrics.switched(self.active, target)
        self.active = target
        # The heaps were ordered by the old policy's key.
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
            self.metrics.decided(ticket.model, ticket.cls, self.active, outcome, wait)
        if self.stats is not None:
            self.stats.decided(ticket.model, outcome)

    def queue_depths(self) -> dict[str, int]:
        """Waiting requests per model name."""
        return {name: q.live for (_, name), q in self._queues.items() if q.live}

    def queue_gauges(self) -> list[tuple[str, int]]:
        """(model name, waiting) of every queue ever used, empty ones included (for /metrics)."""
        return [(name, q.live) for (_, name), q in list(self._queues.items())]

    def engine_load(self) -> dict[str, int]:
        """Requests admitted per engine id and not yet released (a copy)."""
        return dict(self._load)

    def status(self) -> dict[str, Any]:
        """For the management status document."""
        return {
            "policy": self.policy,
            "active_policy": self.active,
            "switches": self.switches,
            "waiting": self._waiting,
            "queues": self.queue_depths(),
            "engine_load": self.engine_load(),
            "max_queue": self.max_queue,
            "queue_timeout_s": self.queue_timeout,
            "max_inflight_per_engine": self.default_limit,
            "slo_reject": self.slo_reject,
        }


def _over_budget(model: str, budget: float, healthy: list[Backend]) -> str:
    """The 429 message when no healthy engine of `model` is within a request's budget."""
    prices = sorted({engine_cost(b) for b in healthy})
    offer = ", ".join(f"{p:g}" for p in prices) or "none healthy"
    return (
        f"no engine of model {model!r} fits the cost budget {budget:g} per 1k tokens "
        f"(engine prices: {offer}); raise X-Cost-Budget or start a cheaper engine "
        "(--cost-per-1k-tokens)"
    )


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
    stats: GatewayStats | None = None,
) -> AdmissionScheduler | None:
    """The scheduler for `config.scheduling`, or None for "none" (no admission control)."""
    if not config.scheduling or config.scheduling == "none":
        return None
    return AdmissionScheduler(config, registry, metrics_registry, stats=stats)
