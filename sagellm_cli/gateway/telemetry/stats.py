"""Aggregate request figures over a sliding window, per model and per engine, in bounded memory.

`GET /v1/management/metrics?window=S` reads them; `sage llm top`, `sage llm serve --status`
and `ControlPlane.metrics()` show them. Prometheus (`/metrics`) keeps cumulative histograms;
these are the figures of the last S seconds, computed in the gateway:

- **Counts and rates** live in one ring of one-second buckets per series (HORIZON_S of
  them), so a window's totals are exact whatever the traffic.
- **Percentiles** come from the latest SAMPLES latencies of each series (a ring buffer),
  sorted when read. Past SAMPLES requests per window they are those of the newest SAMPLES.

A series exists per served model name, per engine id and for the whole gateway (`total`).
Unknown model names never make a series (clients can't grow memory), and series without an
event for HORIZON_S are dropped when a new series is made or the document is built. Everything runs on the gateway's
event loop, so there is no locking; recording a request costs about a microsecond.

The document's shape is `GatewayMetrics.from_dict`'s input (docs/gateway.md, *Aggregate
metrics*).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sagellm_cli.core.errors import BadInput

if TYPE_CHECKING:
    from sagellm_cli.gateway.routing.backend import Backend

HORIZON_S = 600  # the longest window, in seconds (one bucket each)
SAMPLES = 2048  # latencies kept per series for percentiles
DEFAULT_WINDOW_S = 60.0
TOTAL = "*"  # the key of the gateway-wide series
_QUANTILES = (("p50", 50.0), ("p95", 95.0), ("p99", 99.0))


def parse_window(raw: str | None) -> float:
    """`?window=` in seconds: a number in (0, HORIZON_S]; the default when absent."""
    if raw is None or raw == "":
        return DEFAULT_WINDOW_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= HORIZON_S):
        raise BadInput(
            f"query parameter 'window' must be a number of seconds in (0, {HORIZON_S}], "
            f"not {raw!r}",
            hint="e.g. ?window=60",
        )
    return value


class _Series:
    """One model's, engine's or the gateway's figures: per-second buckets and latency rings."""

    __slots__ = ("secs", "completed", "failed", "tokens", "slo_total", "slo_met", "decisions",
                 "latency", "ttft", "last")  # fmt: skip

    def __init__(self, now: float) -> None:
        self.secs = [-1] * HORIZON_S
        self.completed = [0] * HORIZON_S
        self.failed = [0] * HORIZON_S
        self.tokens = [0] * HORIZON_S
        self.slo_total = [0] * HORIZON_S
        self.slo_met = [0] * HORIZON_S
        self.decisions: dict[str, list[int]] = {}
        self.latency: deque[tuple[float, float]] = deque(maxlen=SAMPLES)
        self.ttft: deque[tuple[float, float]] = deque(maxlen=SAMPLES)
        self.last = now  # the latest event (idle series are dropped after HORIZON_S)

    def slot(self, now: float) -> int:
        """The bucket of second `now`, emptied first if it still holds an older second."""
        second = int(now)
        i = second % HORIZON_S
        if self.secs[i] != second:
            self.secs[i] = second
            self.completed[i] = self.failed[i] = self.tokens[i] = 0
            self.slo_total[i] = self.slo_met[i] = 0
            for counts in self.decisions.values():
                counts[i] = 0
        self.last = now
        return i

    def finished(self, now: float, ok: bool, seconds: float, slo_met: bool | None) -> None:
        i = self.slot(now)
        if ok:
            self.completed[i] += 1
            self.latency.append((now, seconds))
        else:
            self.failed[i] += 1
        if slo_met is not None:
            self.slo_total[i] += 1
            if slo_met:
                self.slo_met[i] += 1

    def decided(self, now: float, outcome: str) -> None:
        i = self.slot(now)
        counts = self.decisions.get(outcome)
        if counts is None:
            counts = self.decisions[outcome] = [0] * HORIZON_S
        counts[i] += 1

    def window(self, now: float, window: float, span: float) -> dict[str, Any]:
        """Counts, rates and percentiles of the last `window` seconds (`span`: the divisor)."""
        oldest = int(now) - math.ceil(window) + 1
        live = [i for i, s in enumerate(self.secs) if s >= oldest]
        completed = sum(self.completed[i] for i in live)
        slo_total = sum(self.slo_total[i] for i in live)
        slo_met = sum(self.slo_met[i] for i in live)
        admission = {k: n for k, c in self.decisions.items() if (n := sum(c[i] for i in live))}
        since = now - window
        return {
            "completed": completed,
            "failed": sum(self.failed[i] for i in live),
            "requests_per_s": round(completed / span, 4),
            "output_tokens_per_s": round(sum(self.tokens[i] for i in live) / span, 4),
            "latency_ms": _percentiles(v for t, v in self.latency if t >= since),
            "ttft_ms": _percentiles(v for t, v in self.ttft if t >= since),
            "slo": {
                "with_deadline": slo_total,
                "met": slo_met,
                "compliance": round(slo_met / slo_total, 4) if slo_total else None,
            },
            "admission": admission,
        }


def _percentiles(seconds: Iterable[float]) -> dict[str, Any]:
    """Nearest-rank p50/p95/p99 and the mean, in ms (None when there is no sample)."""
    values = sorted(seconds)
    n = len(values)
    out: dict[str, Any] = {"count": n}
    for name, q in _QUANTILES:
        out[name] = round(values[max(0, math.ceil(q / 100 * n) - 1)] * 1000, 3) if n else None
    out["mean"] = round(sum(values) / n * 1000, 3) if n else None
    return out


class GatewayStats:
    """The recorder the proxy and the scheduler call, and the document built from it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.started = clock()
        self.models: dict[str, _Series] = {}
        self.engines: dict[str, _Series] = {}
        self.total = _Series(self.started)

    def _model(self, name: str) -> _Series:
        series = self.models.get(name)
        if series is None:
            now = self.clock()
            self._forget(now)  # a new series is rare: drop idle ones now
            series = self.models[name] = _Series(now)
        return series

    def _engine(self, engine_id: str) -> _Series:
        series = self.engines.get(engine_id)
        if series is None:
            now = self.clock()
            self._forget(now)
            series = self.engines[engine_id] = _Series(now)
        return series

    # -- recording (the hot path) -------------------------------------------------

    def finished(
        self,
        model: str,
        engine: str | None,
        status: int,
        seconds: float,
        deadline_ms: float | None = None,
    ) -> None:
        """A request's final outcome, for its model, the total and the engine that served it.

        2xx is completed, anything else failed (an engine's 4xx, a rejection, 499 when the
        client left). With a deadline, it met its SLO if it completed within it.
        """
        now = self.clock()
        ok = 200 <= status < 300
        met = None if deadline_ms is None else ok and seconds * 1000.0 <= deadline_ms
        if model:
            self._model(model).finished(now, ok, seconds, met)
        self.total.finished(now, ok, seconds, met)
        if engine:
            self._engine(engine).finished(now, ok, seconds, met)

    def attempt_failed(self, engine: str, seconds: float) -> None:
        """An attempt failed on `engine` before any byte reached the client (it may be retried
        elsewhere): the engine's failure; the request's outcome is recorded once, later."""
        self._engine(engine).finished(self.clock(), False, seconds, None)

    def first_token(self, model: str, engine: str, seconds: float) -> None:
        """Time from arrival to the first streamed chunk."""
        now = self.clock()
        sample = (now, seconds)
        for series in (self._model(model), self._engine(engine), self.total):
            series.ttft.append(sample)
            series.last = now

    def tokens(self, model: str, engine: str, completion_tokens: int) -> None:
        """Output tokens, from an engine's `usage`."""
        if completion_tokens <= 0:
            return
        now = self.clock()
        for series in (self._model(model), self._engine(engine), self.total):
            series.tokens[series.slot(now)] += completion_tokens

    def decided(self, model: str, outcome: str) -> None:
        """One admission decision of the scheduler (admitted, queued, rejected_..., ...)."""
        now = self.clock()
        self._model(model).decided(now, outcome)
        self.total.decided(now, outcome)

    # -- reading ------------------------------------------------------------------

    def document(
        self,
        window: float = DEFAULT_WINDOW_S,
        backends: Iterable[Backend] = (),
        scheduler: Any = None,
    ) -> dict[str, Any]:
        """The metrics document for the last `window` seconds; live figures (in flight,
        health, queue depth) come from `backends` and `scheduler` at this moment."""
        now = self.clock()
        # Right after start the window is not full yet: rates over the time that passed.
        span = max(1.0, min(window, now - self.started))
        self._forget(now)
        backends = list(backends)
        # A scheduler injected by a test may have only the protocol's methods.
        load = getattr(scheduler, "engine_load", dict)()
        queues = getattr(scheduler, "queue_depths", dict)()
        engines: dict[str, Any] = {}
        for b in backends:
            series = self.engines.get(b.id) or _Series(now)
            engines[b.id] = {
                "model": b.served_model_name,
                "healthy": b.healthy,
                "inflight": b.inflight,
                "admitted": load.get(b.id, 0),
                **series.window(now, window, span),
            }
        names = dict.fromkeys([b.served_model_name for b in backends] + list(self.models))
        models: dict[str, Any] = {}
        for name in names:
            mine = [b for b in backends if b.served_model_name == name]
            series = self.models.get(name) or _Series(now)
            models[name] = {
                "engines": len(mine),
                "healthy_engines": sum(1 for b in mine if b.healthy),
                "inflight": sum(b.inflight for b in mine),
                "queue_depth": queues.get(name, 0),
                **series.window(now, window, span),
            }
        total = {
            "engines": len(backends),
            "healthy_engines": sum(1 for b in backends if b.healthy),
            "inflight": sum(b.inflight for b in backends),
            "queue_depth": sum(queues.values()),
            **self.total.window(now, window, span),
        }
        return {
            "window_s": window,
            "span_s": round(span, 3),
            "at": time.time(),
            "total": total,
            "models": models,
            "engines": engines,
            "scheduling": scheduler.status() if scheduler is not None else {"policy": "none"},
        }

    def _forget(self, now: float) -> None:
        """Drop series with no event for HORIZON_S (stopped engines, models gone)."""
        for table in (self.models, self.engines):
            for key in [k for k, s in table.items() if now - s.last > HORIZON_S]:
                del table[key]


# -- the typed view (the library's `GatewayMetrics`) ------------------------------------


@dataclass(frozen=True)
class Percentiles:
    """Latency percentiles in ms over a window; None where no request had one."""

    count: int = 0
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    mean: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Percentiles:
        data = data or {}
        return cls(**{k: data.get(k) for k in ("p50", "p95", "p99", "mean")},
                   count=int(data.get("count") or 0))  # fmt: skip


@dataclass(frozen=True)
class WindowStats:
    """One model's, engine's or the whole gateway's figures over the window."""

    completed: int = 0
    failed: int = 0
    inflight: int = 0
    requests_per_s: float = 0.0
    output_tokens_per_s: float = 0.0
    latency_ms: Percentiles = field(default_factory=Percentiles)
    ttft_ms: Percentiles = field(default_factory=Percentiles)
    slo_with_deadline: int = 0
    slo_met: int = 0
    slo_compliance: float | None = None
    queue_depth: int = 0
    admission: dict[str, int] = field(default_factory=dict)
    model: str | None = None  # engines only
    healthy: bool | None = None  # engines only

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WindowStats:
        slo = data.get("slo") or {}
        return cls(
            completed=int(data.get("completed", 0)),
            failed=int(data.get("failed", 0)),
            inflight=int(data.get("inflight", 0)),
            requests_per_s=float(data.get("requests_per_s", 0.0)),
            output_tokens_per_s=float(data.get("output_tokens_per_s", 0.0)),
            latency_ms=Percentiles.from_dict(data.get("latency_ms")),
            ttft_ms=Percentiles.from_dict(data.get("ttft_ms")),
            slo_with_deadline=int(slo.get("with_deadline", 0)),
            slo_met=int(slo.get("met", 0)),
            slo_compliance=slo.get("compliance"),
            queue_depth=int(data.get("queue_depth", 0)),
            admission=dict(data.get("admission") or {}),
            model=data.get("model"),
            healthy=data.get("healthy"),
        )


@dataclass(frozen=True)
class GatewayMetrics:
    """`GET /v1/management/metrics` as typed data, with the seeds' `get_metrics()` names."""

    window_s: float
    total: WindowStats
    models: dict[str, WindowStats]
    engines: dict[str, WindowStats]
    scheduling: dict[str, Any]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> GatewayMetrics:
        """Parse the document the gateway returns."""
        return cls(
            window_s=float(doc.get("window_s", DEFAULT_WINDOW_S)),
            total=WindowStats.from_dict(doc.get("total") or {}),
            models={k: WindowStats.from_dict(v) for k, v in (doc.get("models") or {}).items()},
            engines={k: WindowStats.from_dict(v) for k, v in (doc.get("engines") or {}).items()},
            scheduling=dict(doc.get("scheduling") or {}),
            raw=doc,
        )

    # The seeds' PerformanceMetrics names, over the whole gateway and the window.
    @property
    def completed_requests(self) -> int:
        return self.total.completed

    @property
    def failed_requests(self) -> int:
        return self.total.failed

    @property
    def requests_per_second(self) -> float:
        return self.total.requests_per_s

    @property
    def tokens_per_second(self) -> float:
        return self.total.output_tokens_per_s

    @property
    def avg_latency_ms(self) -> float | None:
        return self.total.latency_ms.mean

    @property
    def p95_latency_ms(self) -> float | None:
        return self.total.latency_ms.p95

    @property
    def p99_latency_ms(self) -> float | None:
        return self.total.latency_ms.p99

    @property
    def slo_compliance_rate(self) -> float | None:
        return self.total.slo_compliance

    @property
    def slo_violations(self) -> int:
        return self.total.slo_with_deadline - self.total.slo_met
