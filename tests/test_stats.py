"""Aggregate metrics (gateway/telemetry/stats.py), the cost budget and `sage llm top`, without engines.

The recorder is checked with a hand-driven clock; the metrics route, the cost budget and
the client's headers with the gateway in-process in front of fake upstreams
(tests/fakes.py), since the point is the gateway's own bookkeeping. Real engines are in
tests/test_library.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import pytest
from conftest import invoke
from fakes import FakeUpstream
from test_gateway_support import ADMIN, inprocess_gateway

from sagellm_cli.core.errors import BadInput
from sagellm_cli.core.records import EngineRecord, EngineSpec
from sagellm_cli.core.state import StateStore
from sagellm_cli.gateway.http.request import cost_budget, deadline_of, strip_gateway_fields
from sagellm_cli.gateway.telemetry.stats import (
    HORIZON_S,
    SAMPLES,
    GatewayMetrics,
    GatewayStats,
    parse_window,
)


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeBackend:
    def __init__(self, engine_id, name, healthy=True, inflight=0):
        self.id, self.served_model_name = engine_id, name
        self.healthy, self.inflight = healthy, inflight


def test_window_counts_rates_percentiles_and_slo():
    clock = Clock()
    stats = GatewayStats(clock)
    clock.now += 120  # the gateway has run longer than the window
    for i in range(100):  # latencies 10..1000 ms, one request every 0.5 s
        clock.now += 0.5
        stats.finished("tiny", "e1", 200, (i + 1) / 100, deadline_ms=500)
    stats.finished("tiny", "e1", 502, 0.2, deadline_ms=500)
    stats.first_token("tiny", "e1", 0.05)
    stats.tokens("tiny", "e1", 300)
    stats.decided("tiny", "admitted")
    stats.decided("tiny", "queued")
    doc = stats.document(60, [FakeBackend("e1", "tiny", inflight=2)])
    tiny = doc["models"]["tiny"]
    # The window holds the requests of the last 60 s only.
    inside = [i for i in range(100) if 1000 + 120 + (i + 1) * 0.5 > clock.now - 60]
    assert tiny["completed"] == len(inside)
    assert tiny["failed"] == 1 and tiny["inflight"] == 2 and tiny["engines"] == 1
    lat = tiny["latency_ms"]
    assert lat["count"] == len(inside)
    assert lat["p50"] <= lat["p95"] <= lat["p99"] <= 1000.0 and lat["p50"] > 0
    assert len(inside) == 100 and lat["p99"] == 990.0  # nearest rank: the 99th of 100
    assert tiny["ttft_ms"]["p50"] == 50.0 and tiny["ttft_ms"]["count"] == 1
    assert tiny["output_tokens_per_s"] == pytest.approx(300 / 60, abs=1e-3)
    assert tiny["requests_per_s"] == pytest.approx(len(inside) / 60, abs=1e-3)
    met = sum(1 for i in inside if (i + 1) * 10 <= 500)
    assert tiny["slo"] == {
        "with_deadline": len(inside) + 1,
        "met": met,
        "compliance": round(met / (len(inside) + 1), 4),
    }
    assert tiny["admission"] == {"admitted": 1, "queued": 1}
    assert doc["engines"]["e1"]["completed"] == len(inside)
    assert doc["total"]["completed"] == len(inside) and doc["scheduling"] == {"policy": "none"}


def test_attempt_failures_count_on_the_engine_only():
    stats = GatewayStats(Clock())
    stats.attempt_failed("e1", 0.1)  # retried elsewhere ...
    stats.finished("tiny", "e2", 200, 0.2)  # ... and served by e2
    doc = stats.document(60, [FakeBackend("e1", "tiny"), FakeBackend("e2", "tiny")])
    assert doc["models"]["tiny"]["completed"] == 1 and doc["models"]["tiny"]["failed"] == 0
    assert doc["engines"]["e1"]["failed"] == 1 and doc["engines"]["e2"]["completed"] == 1


def test_a_stream_first_token_then_its_end_keeps_both_series():
    stats = GatewayStats(Clock(10_000.0))  # a monotonic clock is far past the horizon
    stats.first_token("tiny", "e1", 0.05)  # creates the model's and the engine's series
    stats.finished("tiny", "e1", 200, 0.2)
    doc = stats.document(60, [FakeBackend("e1", "tiny")])
    assert doc["models"]["tiny"]["ttft_ms"]["count"] == 1
    assert doc["engines"]["e1"]["ttft_ms"]["count"] == 1


def test_old_events_leave_the_window_and_memory_stays_bounded():
    clock = Clock()
    stats = GatewayStats(clock)
    for _ in range(SAMPLES * 2):
        stats.finished("tiny", "e1", 200, 0.01)
    series = stats.models["tiny"]
    assert len(series.latency) == SAMPLES and len(series.secs) == HORIZON_S
    assert stats.document(60)["models"]["tiny"]["completed"] == SAMPLES * 2  # counts are exact
    clock.now += 61
    doc = stats.document(60)
    assert doc["models"]["tiny"]["completed"] == 0
    assert doc["models"]["tiny"]["latency_ms"]["p50"] is None
    clock.now += HORIZON_S + 1  # nothing for the whole horizon: the series is dropped
    assert stats.document(60)["models"] == {} and stats.engines == {}


def test_window_parameter():
    assert parse_window(None) == 60 and parse_window("5") == 5.0
    for bad in ("0", "-1", "nan", "x", str(HORIZON_S + 1)):
        with pytest.raises(BadInput, match="window"):
            parse_window(bad)


def test_gateway_metrics_typed_view_has_the_seed_names():
    clock = Clock()
    stats = GatewayStats(clock)
    clock.now += 100
    stats.finished("tiny", "e1", 200, 0.1, deadline_ms=50)
    stats.finished("tiny", "e1", 200, 0.03, deadline_ms=50)
    metrics = GatewayMetrics.from_dict(stats.document(60, [FakeBackend("e1", "tiny")]))
    assert metrics.completed_requests == 2 and metrics.failed_requests == 0
    assert metrics.p95_latency_ms == 100.0 and metrics.avg_latency_ms == pytest.approx(65.0)
    assert metrics.slo_compliance_rate == 0.5 and metrics.slo_violations == 1
    assert metrics.engines["e1"].model == "tiny" and metrics.engines["e1"].healthy is True
    assert metrics.models["tiny"].latency_ms.count == 2


def test_request_fields_cost_budget_and_deadline():
    assert cost_budget({}, [(b"x-cost-budget", b"0.5")]) == 0.5
    assert cost_budget({"cost_budget": 2}, []) == 2.0
    assert cost_budget({}, []) is None
    for bad in ("-1", "nan", "cheap", True):
        with pytest.raises(ValueError, match="cost budget"):
            cost_budget({"cost_budget": bad}, [])
    assert deadline_of({"slo_deadline_ms": 100}, []) == 100
    assert deadline_of({"slo_deadline_ms": 100}, [(b"x-slo-deadline-ms", b"5")]) == 5
    body = {"cost_budget": 1, "x": 1}
    assert strip_gateway_fields(body) and body == {"x": 1}


# -- the gateway in-process, in front of fake engines -------------------------------------


def _record(engine_id: str, port: int, cost: float | None = None) -> EngineRecord:
    spec = EngineSpec(model="/models/tiny", cost_per_1k_tokens=cost)
    return EngineRecord(
        id=engine_id, kind="llm", runtime="vllm", model="/models/tiny",
        served_model_name="tiny", host="127.0.0.1", port=port, status="ready",
        created_at=time.time(), spec=spec,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def _gateway(tmp_path, upstreams, costs, **cfg):
    store = StateStore(tmp_path / "state.json")
    with store.transaction() as state:
        for i, (upstream, cost) in enumerate(zip(upstreams, costs, strict=True)):
            state.engines[f"e{i}"] = _record(f"e{i}", upstream.port, cost)
    async with inprocess_gateway(
        tmp_path / "state.json", health_interval_s=30, admin_token="t", **cfg
    ) as (gateway, client):
        yield gateway, client


def _chat(**extra):
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **extra}


def test_metrics_route_needs_the_admin_token_and_reports_models_and_engines(tmp_path):
    async def main():
        with FakeUpstream(chunks=4, ttft=0.02) as upstream:
            async with _gateway(tmp_path, [upstream], [None]) as (gateway, client):
                assert (await client.get("/v1/management/metrics")).status_code == 401
                for _ in range(3):
                    r = await client.post("/v1/chat/completions", json=_chat(max_tokens=4),
                                          headers={"X-SLO-Deadline-Ms": "60000"})  # fmt: skip
                    assert r.status_code == 200
                r = await client.post(
                    "/v1/chat/completions",
                    json=_chat(stream=True, stream_options={"include_usage": True}),
                )
                assert r.status_code == 200 and "[DONE]" in r.text
                bad = await client.get("/v1/management/metrics?window=x", headers=ADMIN)
                assert bad.status_code == 400 and "window" in bad.text
                doc = (await client.get("/v1/management/metrics?window=30",
                                        headers=ADMIN)).json()  # fmt: skip
        tiny = doc["models"]["tiny"]
        assert doc["window_s"] == 30 and tiny["completed"] == 4 and tiny["failed"] == 0
        assert tiny["latency_ms"]["p50"] > 0 and tiny["ttft_ms"]["count"] == 1
        assert tiny["ttft_ms"]["p50"] >= 20
        assert tiny["slo"]["with_deadline"] == 3 and tiny["slo"]["compliance"] == 1.0
        assert tiny["output_tokens_per_s"] > 0
        assert doc["engines"]["e0"]["completed"] == 4 and doc["engines"]["e0"]["healthy"]

    asyncio.run(main())


def test_cost_budget_picks_engines_within_it_or_answers_429(tmp_path):
    async def main():
        with FakeUpstream() as cheap, FakeUpstream() as dear:
            async with _gateway(
                tmp_path, [cheap, dear], [0.1, 1.0], scheduling="cost", max_inflight_per_engine=4
            ) as (gateway, client):
                r = await client.post("/v1/chat/completions", json=_chat(),
                                      headers={"X-Cost-Budget": "0.05"})  # fmt: skip
                assert r.status_code == 429
                error = r.json()["error"]
                assert error["code"] == "cost_budget_exceeded"
                assert "0.05" in error["message"] and "0.1, 1" in error["message"]
                r = await client.post("/v1/chat/completions", json=_chat(cost_budget=0.5))
                assert r.status_code == 200 and r.headers["x-sagellm-engine"] == "e0"
                assert "cost_budget" not in cheap.bodies[-1]
                r = await client.post("/v1/chat/completions", json=_chat(cost_budget="lots"))
                assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_cost_budget"
                metrics = (await client.get("/v1/management/metrics", headers=ADMIN)).json()
                assert metrics["models"]["tiny"]["admission"]["rejected_cost_budget"] == 1
                assert metrics["models"]["tiny"]["failed"] == 2  # the 429 and the 400

    asyncio.run(main())


def test_cost_budget_waits_for_a_cheap_engine_instead_of_spilling(tmp_path):
    async def main():
        with FakeUpstream(held=True, echo=True) as cheap, FakeUpstream(echo=True) as dear:
            async with _gateway(
                tmp_path, [cheap, dear], [0.1, 1.0], scheduling="cost", max_inflight_per_engine=1
            ) as (gateway, client):

                def post(tag, **extra):
                    body = {"model": "tiny", "messages": [{"role": "user", "content": tag}]}
                    return asyncio.ensure_future(
                        client.post("/v1/chat/completions", json={**body, **extra})
                    )

                first = post("a")  # takes the cheap engine's only slot
                deadline = time.monotonic() + 10
                while len(cheap.bodies) < 1:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.01)
                budgeted = post("b", cost_budget=0.2)  # must wait for the cheap engine
                while gateway.scheduler.queue_depths() != {"tiny": 1}:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.01)
                unbudgeted = post("c")  # may use the dear one at once
                r = await unbudgeted
                assert r.status_code == 200 and r.headers["x-sagellm-engine"] == "e1"
                assert not budgeted.done()
                cheap.release("a")
                cheap.release("b")
                assert (await first).status_code == 200
                r = await budgeted
                assert r.status_code == 200 and r.headers["x-sagellm-engine"] == "e0"

    asyncio.run(main())


def test_client_sends_the_gateways_headers_and_parses_streams(tmp_path):
    from sagellm_cli.client import GatewayNotFound, UnifiedInferenceClient, _split

    with pytest.raises(BadInput, match="priority"):
        _split({"priority": "urgent"})
    with pytest.raises(BadInput, match="slo_deadline_ms"):
        _split({"slo_deadline_ms": -1})
    with pytest.raises(BadInput, match="http"):
        UnifiedInferenceClient("localhost:8889")
    with FakeUpstream(chunks=3) as upstream, UnifiedInferenceClient(upstream.url) as client:
        text = client.chat("hi", model="fake", priority="HIGH", slo_deadline_ms=250,
                           cost_budget=0.5, max_tokens=3)  # fmt: skip
        assert text and client.last_usage["completion_tokens"] == 3
        seen = upstream.seen[-1]
        headers = {k.lower(): v for k, v in seen["headers"].items()}
        assert headers["x-priority"] == "high" and headers["x-slo-deadline-ms"] == "250"
        assert headers["x-cost-budget"] == "0.5"
        assert seen["body"]["max_tokens"] == 3 and "priority" not in seen["body"]
        deltas = list(client.generate("x", model="fake", stream=True, max_tokens=3))
        assert len(deltas) == 3 and upstream.bodies[-1]["stream_options"]["include_usage"]
        assert client.last_usage is not None
    upstream_status = FakeUpstream(status=404)
    with upstream_status, UnifiedInferenceClient(upstream_status.url) as client:
        with pytest.raises(GatewayNotFound) as exc:
            client.chat("hi", model="fake")
        assert exc.value.status == 404 and exc.value.exit_code == 3


def test_client_create_without_a_gateway_is_not_found(home):
    from sagellm_cli.client import UnifiedInferenceClient
    from sagellm_cli.core.errors import NotFound

    with pytest.raises(NotFound, match="no running gateway"):
        UnifiedInferenceClient.create()


def test_top_json_without_a_gateway(home):
    result = invoke("llm", "top", "--json", "--count", "2", "--interval", "0.05")
    assert result.exit_code == 0, result.output
    docs = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(docs) == 2
    for doc in docs:
        assert doc["engines"] == [] and doc["gateway"] is None and doc["metrics"] is None
        assert "gpus" in doc["gpus"]
    assert invoke("llm", "top", "--interval", "0").exit_code == 2
    assert invoke("llm", "top", "--window", "601", "--json").exit_code == 2
    status = invoke("llm", "serve", "--status", "--json")
    assert json.loads(status.stdout) == {"running": False}  # metrics only while one runs


def test_top_renders_models_engines_and_gpus():
    from rich.console import Console

    from sagellm_cli.cli.top import render

    stats = GatewayStats(Clock())
    stats.finished("tiny", "e1", 200, 0.25, deadline_ms=1000)
    stats.first_token("tiny", "e1", 0.05)
    engine = {"id": "e1", "label": "r1", "served_model_name": "tiny", "status": "ready",
              "gpus": [0], "started_at": time.time() - 75}  # fmt: skip
    gpu = {"index": 0, "name": "H200", "memory_used_mib": 2048, "memory_total_mib": 143771,
           "sagellm_reserved_gib": 20.0, "utilization_gpu_pct": 7}  # fmt: skip
    doc = {
        "at": time.time(), "engines": [engine], "gpus": {"gpus": [gpu]},
        "gateway": {"url": "http://127.0.0.1:8889"}, "metrics_error": None,
        "metrics": stats.document(60, [FakeBackend("e1", "tiny", inflight=1)]),
    }  # fmt: skip
    console = Console(width=200, record=True)
    for part in render(doc):
        console.print(part)
    text = console.export_text()
    assert "1 done" in text and "tiny" in text and "r1" in text and "1m15s" in text
    assert "250" in text and "100%" in text and "H200" in text and "20.0" in text
