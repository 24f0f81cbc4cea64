"""Prometheus metrics on the gateway's own CollectorRegistry.

Per-request cost is kept small: label children are cached in dicts, and the
gauges (in-flight, health, queue depth) are read from the registry or the scheduler
at scrape time instead of being updated on every request.

`Metrics` is the gateway's; `SchedulerMetrics` adds the admission scheduler's
(docs/scheduling.md) to the same registry when a scheduler is installed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

if TYPE_CHECKING:
    from sagellm_cli.gateway.routing.registry import Registry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
# How often the event-loop lag probe wakes (docs/gateway.md, "Where the time goes").
LAG_PROBE_INTERVAL = 0.05


class _EngineCollector:
    """In-flight requests and health, read from the registry when scraped."""

    def __init__(self, registry: Registry):
        self.registry = registry

    def collect(self):
        inflight = GaugeMetricFamily(
            "sagellm_gateway_requests_in_flight",
            "Requests the gateway is proxying right now, per engine.",
            labels=["model", "engine"],
        )
        healthy = GaugeMetricFamily(
            "sagellm_gateway_engine_healthy",
            "1 while the gateway routes to the engine, 0 while it is unhealthy.",
            labels=["model", "engine", "kind"],
        )
        failures = GaugeMetricFamily(
            "sagellm_gateway_engine_consecutive_failures",
            "Consecutive failed requests or health checks, per engine.",
            labels=["model", "engine"],
        )
        for b in list(self.registry.backends.values()):
            inflight.add_metric([b.served_model_name, b.id], b.inflight)
            healthy.add_metric([b.served_model_name, b.id, b.kind], 1 if b.healthy else 0)
            failures.add_metric([b.served_model_name, b.id], b.failures)
        yield inflight
        yield healthy
        yield failures
        kv_index = getattr(self.registry, "kv_index", None)
        if kv_index is not None:
            yield from _kv_metrics(kv_index, self.registry)


def _kv_metrics(kv_index, registry: Registry):
    """`kv` routing's view of each engine's cache, from its KV events."""
    blocks = GaugeMetricFamily(
        "sagellm_gateway_kv_cached_blocks",
        "Prompt blocks an engine has cached, as its KV events told the gateway.",
        labels=["model", "engine"],
    )
    events = GaugeMetricFamily(
        "sagellm_gateway_kv_events",
        "KV events received from an engine since the gateway subscribed.",
        labels=["model", "engine"],
    )
    for b in list(registry.backends.values()):
        index = kv_index.index_for(b)
        if index is not None:
            blocks.add_metric([b.served_model_name, b.id], index.blocks)
            events.add_metric([b.served_model_name, b.id], index.events)
    tokenizers = GaugeMetricFamily(
        "sagellm_gateway_kv_tokenizer_loaded",
        "1 once `kv` routing has the model's tokenizer (until then it routes by characters).",
        labels=["model"],
    )
    for model, tokenizer in list(kv_index.tokenizers.items()):
        tokenizers.add_metric([model], 0 if tokenizer is None else 1)
    expected = GaugeMetricFamily(
        "sagellm_gateway_kv_routed_blocks",
        "Prompt blocks `kv` routing placed, and those it expected cached on the chosen engine.",
        labels=["kind"],
    )
    expected.add_metric(["routed"], kv_index.routed_blocks)
    expected.add_metric(["expected_hit"], kv_index.expected_hit_blocks)
    yield blocks
    yield events
    yield tokenizers
    yield expected


class Metrics:
    """The gateway's metrics, with cached label children for the hot path."""

    def __init__(self, registry: Registry):
        # `_created` series double the output and nobody graphs them.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "sagellm_gateway_requests_total",
            "Requests by model, engine, endpoint and HTTP status.",
            ["model", "engine", "endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "sagellm_gateway_request_duration_seconds",
            "Time from request received to response complete.",
            ["model", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "sagellm_gateway_time_to_first_token_seconds",
            "Streaming requests: time from request received to the first chunk sent.",
            ["model", "endpoint"],
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "sagellm_gateway_tokens_total",
            "Tokens reported by engines' usage, by direction (prompt = in, completion = out).",
            ["model", "direction"],
            registry=self.registry,
        )
        self.retries = Counter(
            "sagellm_gateway_retries_total",
            "Requests retried on another replica after a failure before any byte was sent.",
            ["model"],
            registry=self.registry,
        )
        self.loop_lag = Histogram(
            "sagellm_gateway_event_loop_lag_seconds",
            f"How late a {LAG_PROBE_INTERVAL * 1000:g} ms timer fires on the gateway's event "
            "loop: time the loop spent busy with other work.",
            buckets=_LAG_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(registry))
        self._requests: dict[tuple, object] = {}
        self._latency: dict[tuple, object] = {}
        self._ttft: dict[tuple, object] = {}
        self._tokens: dict[tuple, object] = {}

    def observe(self, model: str, engine: str, endpoint: str, status: int, seconds: float) -> None:
        """One finished request."""
        key = (model, engine, endpoint, status)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.requests.labels(model, engine, endpoint, str(status))
        child.inc()
        key2 = (model, endpoint)
        hist = self._latency.get(key2)
        if hist is None:
            hist = self._latency[key2] = self.latency.labels(model, endpoint)
        hist.observe(seconds)

    def first_token(self, model: str, endpoint: str, seconds: float) -> None:
        """Time to the first streamed chunk."""
        key = (model, endpoint)
        hist = self._ttft.get(key)
        if hist is None:
            hist = self._ttft[key] = self.ttft.labels(model, endpoint)
        hist.observe(seconds)

    def usage(self, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Tokens in and out, from an engine's `usage`."""
        key = (model,)
        pair = self._tokens.get(key)
        if pair is None:
            pair = self._tokens[key] = (
                self.tokens.labels(model, "in"),
                self.tokens.labels(model, "out"),
            )
        if prompt_tokens:
            pair[0].inc(prompt_tokens)
        if completion_tokens:
            pair[1].inc(completion_tokens)

    def retry(self, model: str) -> None:
        """One retry on another replica."""
        self.retries.labels(model).inc()

    async def probe_loop_lag(self) -> None:
        """Forever: sleep LAG_PROBE_INTERVAL and record how late the wake-up came."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + LAG_PROBE_INTERVAL
            await asyncio.sleep(LAG_PROBE_INTERVAL)
            self.loop_lag.observe(max(0.0, loop.time() - due))

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)


class QueueSource(Protocol):
    """What the queue collector reads from a scheduler when scraped."""

    policy: str
    active: str

    def queue_gauges(self) -> Iterable[tuple[str, int]]: ...

    def engine_load(self) -> dict[str, int]: ...


class SchedulerMetrics:
    """Queue depth (read at scrape time), wait times, decisions and adaptive switches."""

    def __init__(self, registry: CollectorRegistry, scheduler: QueueSource):
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

    def decided(self, model: str, cls: str, policy: str, outcome: str, wait: float | None) -> None:
        """One admission decision for a request of `model` and priority class `cls`; `wait`
        (seconds queued) is observed when not None."""
        key = (model, policy, outcome)
        child = self._decisions.get(key)
        if child is None:
            child = self._decisions[key] = self.decisions.labels(*key)
        child.inc()
        if wait is not None:
            key2 = (model, cls)
            hist = self._wait.get(key2)
            if hist is None:
                hist = self._wait[key2] = self.wait.labels(*key2)
            hist.observe(wait)

    def switched(self, old: str, new: str) -> None:
        """adaptive switched from `old` to `new`."""
        self.switches.labels(old, new).inc()


class _QueueCollector:
    """Queue depth, the policy in effect and per-engine admitted load, read when scraped."""

    def __init__(self, scheduler: QueueSource):
        self.scheduler = scheduler

    def collect(self):
        depth = GaugeMetricFamily(
            "sagellm_gateway_queue_depth",
            "Requests waiting in the gateway's queue, per model.",
            labels=["model"],
        )
        for name, live in self.scheduler.queue_gauges():
            depth.add_metric([name], live)
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
        for engine, n in self.scheduler.engine_load().items():
            slots.add_metric([engine], n)
        yield depth
        yield active
        yield slots
