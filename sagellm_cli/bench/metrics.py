"""Per-request records and their summary (overall and per priority class).

Definitions (docs/bench.md has the long form):
- TTFT: request sent -> first chunk that carries output text.
- ITL: gaps between successive output-carrying chunks (all requests pooled).
- TPOT: per request, (E2E - TTFT) / (output tokens - 1).
- E2E: request sent -> last byte of the response.
- goodput: successful requests that met every SLO set for their class, per second.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """What happened to one request. Times are seconds; `start_s` is from the run's start."""

    index: int
    cls: str
    start_s: float
    warmup: bool = False
    ok: bool = False
    status: int | None = None
    error: str | None = None
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    output_tokens: int = 0
    input_tokens: int | None = None
    token_source: str = "none"  # usage | chunks | none
    slo_ttft_ms: float | None = None
    slo_e2e_ms: float | None = None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first."""
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def has_slo(self) -> bool:
        return self.slo_ttft_ms is not None or self.slo_e2e_ms is not None

    @property
    def met_slo(self) -> bool | None:
        """True when the request succeeded within its SLOs; None when it had none."""
        if not self.has_slo:
            return None
        if not self.ok:
            return False
        if self.slo_ttft_ms is not None and (
            self.ttft_s is None or self.ttft_s * 1000 > self.slo_ttft_ms
        ):
            return False
        return not (
            self.slo_e2e_ms is not None
            and (self.e2e_s is None or self.e2e_s * 1000 > self.slo_e2e_ms)
        )

    @property
    def end_s(self) -> float | None:
        return None if self.e2e_s is None else self.start_s + self.e2e_s

    def to_dict(self) -> dict[str, Any]:
        """JSON form: the fields plus the derived TPOT and SLO verdict."""
        out = asdict(self)
        out["tpot_s"] = self.tpot_s
        out["met_slo"] = self.met_slo
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestRecord:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})


def percentile(sorted_values: list[float], p: float) -> float:
    """Linear-interpolated percentile of an already sorted list (numpy's default method)."""
    if not sorted_values:
        return math.nan
    k = (len(sorted_values) - 1) * p / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def distribution_ms(values_s: list[float]) -> dict[str, float | int | None]:
    """mean/p50/p90/p99 in milliseconds; None (not NaN, for JSON) when there are no values."""
    values = sorted(v * 1000 for v in values_s)
    if not values:
        return {"count": 0, "mean": None, **{f"p{p}": None for p in PERCENTILES}}
    out: dict[str, float | int | None] = {"count": len(values), "mean": sum(values) / len(values)}
    for p in PERCENTILES:
        out[f"p{p}"] = percentile(values, p)
    return out


def summarize_group(records: list[RequestRecord], duration_s: float) -> dict[str, Any]:
    """The summary of one group of measured records over the run's duration."""
    ok = [r for r in records if r.ok]
    duration = max(duration_s, 1e-9)
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.input_tokens or 0 for r in ok)
    with_slo = [r for r in records if r.has_slo]
    met = sum(1 for r in with_slo if r.met_slo)
    errors = Counter(r.error or f"HTTP {r.status}" for r in records if not r.ok)
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "error_kinds": dict(errors.most_common(5)),
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "input_throughput": in_tokens / duration,
        "total_output_tokens": out_tokens,
        "total_input_tokens": in_tokens,
        "slo_requests": len(with_slo),
        "slo_met": met if with_slo else None,
        "slo_attainment": (met / len(with_slo)) if with_slo else None,
        "goodput": (met / duration) if with_slo else None,
        "ttft_ms": distribution_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_ms": distribution_ms([t for r in ok if (t := r.tpot_s) is not None]),
        "itl_ms": distribution_ms([g for r in ok for g in r.itl_s]),
        "e2e_ms": distribution_ms([r.e2e_s for r in ok if r.e2e_s is not None]),
    }


def summarize(records: list[RequestRecord], duration_s: float | None = None) -> dict[str, Any]:
    """{"all": ..., "classes": {cls: ...}} over the measured (non-warm-up) records.

    `duration_s` defaults to first start -> last end of those records.
    """
    measured = [r for r in records if not r.warmup]
    if duration_s is None:
        duration_s = measured_duration(measured)
    classes = sorted({r.cls for r in measured})
    return {
        "all": summarize_group(measured, duration_s),
        "classes": {
            c: summarize_group([r for r in measured if r.cls == c], duration_s) for c in classes
        },
    }


def measured_duration(records: list[RequestRecord]) -> float:
    """First start to last end (or last start, for requests that never ended)."""
    if not records:
        return 0.0
    first = min(r.start_s for r in records)
    last = max((r.end_s if r.end_s is not None else r.start_s) for r in records)
    return max(last - first, 0.0)


def token_times(record: RequestRecord) -> list[float]:
    """Absolute times (from the run's start) at which output chunks arrived."""
    if record.ttft_s is None:
        return []
    t = record.start_s + record.ttft_s
    times = [t]
    for gap in record.itl_s:
        t += gap
        times.append(t)
    return times


def throughput_timeline(
    records: list[RequestRecord], bin_s: float = 1.0
) -> tuple[list[float], list[float], list[float]]:
    """(bin starts, output tokens/s, completed requests/s) over the measured records.

    A request's tokens are spread over its chunks' arrival times (all at its end
    when it did not stream).
    """
    measured = [r for r in records if not r.warmup and r.ok]
    if not measured:
        return [], [], []
    t0 = min(r.start_s for r in measured)
    t1 = max(r.end_s or r.start_s for r in measured)
    n = max(1, math.ceil((t1 - t0) / bin_s))
    tokens = [0.0] * n
    done = [0.0] * n

    def slot(t: float) -> int:
        return max(0, min(int((t - t0) / bin_s), n - 1))

    for r in measured:
        times = token_times(r) or ([r.end_s] if r.end_s is not None else [])
        weight = r.output_tokens / len(times) if times else 0.0
        for t in times:
            tokens[slot(t)] += weight
        if r.end_s is not None:
            done[slot(r.end_s)] += 1
    starts = [i * bin_s for i in range(n)]
    return starts, [c / bin_s for c in tokens], [d / bin_s for d in done]
