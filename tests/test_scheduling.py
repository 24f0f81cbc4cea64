"""The gateway's scheduler: admission limits, queue order per policy, rejections, adaptive.

Two levels, both deterministic and without real engines:
- direct calls on `AdmissionScheduler` over a real `Registry` loaded from engine
  records, with a hand-driven clock where estimates matter; a request "finishes"
  when the test releases its ticket;
- the whole gateway app in-process (`httpx.ASGITransport`) in front of the fake
  upstream (tests/fakes.py) holding every request until the test releases it by
  hand, so the order in which requests reach the engine is observable over HTTP.
No assertion depends on how fast anything runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

import pytest
from fakes import FakeUpstream
from test_gateway_support import inprocess_gateway

from sagellm_cli.core.errors import BadInput
from sagellm_cli.core.records import EngineRecord, EngineSpec
from sagellm_cli.core.state import State, StateStore
from sagellm_cli.gateway.admission.policies import adaptive_choice, order_key
from sagellm_cli.gateway.admission.scheduling import AdmissionScheduler, Rejected
from sagellm_cli.gateway.config import GatewayConfig
from sagellm_cli.gateway.http.request import strip_gateway_fields
from sagellm_cli.gateway.routing.registry import Registry
from sagellm_cli.gateway.routing.strategies import RouteInfo


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _record(i, *, name="m", role="general", max_inflight=None, cost=None, port=None):
    spec = EngineSpec(model=f"/models/{name}", max_inflight=max_inflight, cost_per_1k_tokens=cost)
    return EngineRecord(
        id=f"e{i:07d}",
        kind="llm",
        runtime="vllm",
        model=f"/models/{name}",
        served_model_name=name,
        host="127.0.0.1",
        port=port or 9000 + i,
        status="ready",
        created_at=time.time() + i,
        role=role,
        spec=spec,
    )


def _setup(records, clock=None, **cfg):
    cfg.setdefault("scheduling", "fifo")
    cfg.setdefault("max_inflight_per_engine", 1)
    config = GatewayConfig(**cfg)
    config.validate()
    state = State()
    for r in records:
        state.engines[r.id] = r
    registry = Registry(config)
    registry.load(state)
    from prometheus_client import CollectorRegistry

    metrics = CollectorRegistry()
    kwargs = {"clock": clock} if clock else {}
    sched = AdmissionScheduler(config, registry, metrics, **kwargs)
    return sched, registry, metrics


def _chat(text="x"):
    return {"model": "m", "messages": [{"role": "user", "content": text}]}


def _hdrs(priority=None, deadline_ms=None):
    out = []
    if priority:
        out.append((b"x-priority", priority.encode()))
    if deadline_ms is not None:
        out.append((b"x-slo-deadline-ms", str(deadline_ms).encode()))
    return out


async def _yield(n=5):
    for _ in range(n):
        await asyncio.sleep(0)


class Harness:
    """Starts admissions as tasks (in arrival order) and releases tickets by hand."""

    def __init__(self, sched, registry, name="m"):
        self.sched = sched
        self.group = registry.group("llm", name)
        self.order: list[str] = []
        self.tickets: dict[str, object] = {}
        self.errors: dict[str, Exception] = {}
        self.tasks: list[asyncio.Task] = []

    async def arrive(self, label, body=None, headers=(), receive=None):
        body = body or _chat(label)

        async def go():
            try:
                t = await self.sched.admit(
                    self.group, body, RouteInfo(body, None), headers, receive
                )
            except Rejected as exc:
                self.errors[label] = exc
                return
            self.order.append(label)
            self.tickets[label] = t

        self.tasks.append(asyncio.ensure_future(go()))
        await _yield()

    async def finish(self, label):
        self.sched.release(self.tickets[label])
        await _yield()

    async def drain(self, first):
        """Release `first`, then each newly admitted request in turn; return the order."""
        start = len(self.order)
        await self.finish(first)
        while len(self.order) > start and any(not t.done() for t in self.tasks):
            await self.finish(self.order[-1])
        for label in self.order[start:]:
            self.sched.release(self.tickets[label])
        await _yield()
        return self.order[start:]


def run(coro):
    return asyncio.run(coro)


def _sample(metrics, name, labels=None):
    return metrics.get_sample_value(name, labels or {})


# -- queue order per policy ----------------------------------------------------------


def test_fifo_admits_in_arrival_order_and_holds_the_limit():
    async def main():
        sched, reg, metrics = _setup([_record(0)], scheduling="fifo")
        h = Harness(sched, reg)
        await h.arrive("first")
        for label, prio in (("a", "low"), ("b", "critical"), ("c", None), ("d", "high")):
            await h.arrive(label, headers=_hdrs(prio))
        assert h.order == ["first"]  # limit 1: the others wait
        assert sched.queue_depths() == {"m": 4}
        assert _sample(metrics, "sagellm_gateway_queue_depth", {"model": "m"}) == 4
        assert await h.drain("first") == ["a", "b", "c", "d"]
        assert sched.queue_depths() == {}
        assert sched.load(reg.backends["e0000000"]) == 0
        labels = {"model": "m", "policy": "fifo", "outcome": "queued"}
        assert _sample(metrics, "sagellm_gateway_scheduler_decisions_total", labels) == 4

    run(main())


def test_priority_orders_by_class_fifo_within_class_header_or_body():
    async def main():
        sched, reg, metrics = _setup([_record(0)], scheduling="priority")
        h = Harness(sched, reg)
        await h.arrive("first")
        await h.arrive("low1", headers=_hdrs("low"))
        await h.arrive("norm1")  # no class: normal
        await h.arrive("crit1", headers=_hdrs("critical"))
        await h.arrive("high1", body={**_chat("high1"), "priority": "HIGH"})  # body, any case
        await h.arrive("crit2", headers=_hdrs("critical"))
        await h.arrive("norm2", headers=_hdrs("bogus"))  # unknown: normal
        await h.arrive("crit3", body={**_chat("c3"), "priority": "low"}, headers=_hdrs("critical"))
        order = await h.drain("first")
        assert order == ["crit1", "crit2", "crit3", "high1", "norm1", "norm2", "low1"]
        count = _sample(
            metrics,
            "sagellm_gateway_queue_wait_seconds_count",
            {"model": "m", "priority": "critical"},
        )
        assert count == 3

    run(main())


def test_slo_aware_is_earliest_deadline_first():
    async def main():
        sched, reg, _ = _setup([_record(0)], scheduling="slo_aware")
        h = Harness(sched, reg)
        await h.arrive("first")
        await h.arrive("d5000", headers=_hdrs(deadline_ms=5000))
        await h.arrive("none1")
        await h.arrive("d1000", headers=_hdrs(deadline_ms=1000))
        await h.arrive("d3000", body={**_chat("x"), "slo_deadline_ms": 3000})
        await h.arrive("none2")
        assert await h.drain("first") == ["d1000", "d3000", "d5000", "none1", "none2"]

    run(main())


def test_order_keys():
    assert order_key("fifo", 7, 0, 1.0) == (7,)
    assert order_key("cost", 7, 0, 1.0) == (7,)
    assert order_key("priority", 7, 1, None) < order_key("priority", 3, 2, None)
    assert order_key("slo_aware", 9, 2, None) > order_key("slo_aware", 10, 2, 5.0)


# -- rejections ------------------------------------------------------------------------


def test_max_queue_rejects_with_429_and_retry_after():
    async def main():
        sched, reg, metrics = _setup([_record(0)], max_queue=2)
        h = Harness(sched, reg)
        for label in ("first", "q1", "q2", "over"):
            await h.arrive(label)
        exc = h.errors["over"]
        assert exc.status == 429 and exc.code == "queue_full"
        assert dict(exc.headers())[b"retry-after"].isdigit()
        assert "--max-queue 2" in exc.message
        labels = {"model": "m", "policy": "fifo", "outcome": "rejected_queue_full"}
        assert _sample(metrics, "sagellm_gateway_scheduler_decisions_total", labels) == 1
        assert await h.drain("first") == ["q1", "q2"]

    run(main())


def test_queue_timeout_gives_503_and_frees_the_place():
    async def main():
        sched, reg, _ = _setup([_record(0)], queue_timeout_s=0.05)
        h = Harness(sched, reg)
        await h.arrive("first")
        await h.arrive("late")
        await asyncio.wait_for(h.tasks[-1], 5)
        exc = h.errors["late"]
        assert exc.status == 503 and exc.code == "queue_timeout"
        assert exc.headers()[0][0] == b"retry-after"
        assert sched.queue_depths() == {}
        await h.arrive("next")
        assert await h.drain("first") == ["next"]  # the timed-out one never got the slot

    run(main())


def test_slo_reject_on_arrival_and_when_its_turn_comes():
    async def main():
        clock = Clock()
        sched, reg, metrics = _setup([_record(0)], clock, scheduling="slo_aware", slo_reject=True)
        h = Harness(sched, reg)
        # Before 3 requests finished there is no estimate: nothing is rejected.
        await h.arrive("tight0", headers=_hdrs(deadline_ms=1))
        assert "tight0" in h.order
        clock.now += 1.0
        await h.finish("tight0")
        for i in range(2):  # service time 1 s, three samples
            await h.arrive(f"w{i}")
            clock.now += 1.0
            await h.finish(f"w{i}")
        assert sched.service_estimate(("llm", "m")) == pytest.approx(1.0)
        # Free engine, 1 s of service, 0.5 s of budget: rejected at once.
        await h.arrive("tight", headers=_hdrs(deadline_ms=500))
        assert h.errors["tight"].status == 429 and h.errors["tight"].code == "deadline_unmeetable"
        await h.arrive("ok", headers=_hdrs(deadline_ms=5000))
        assert "ok" in h.order
        # Engine busy, two earlier deadlines queued ahead: about 3 s of waiting + 1 s of service.
        await h.arrive("q1", headers=_hdrs(deadline_ms=3000))
        await h.arrive("q2", headers=_hdrs(deadline_ms=3000))
        await h.arrive("doomed", headers=_hdrs(deadline_ms=3500))
        assert h.errors["doomed"].code == "deadline_unmeetable"
        await h.arrive("fits", headers=_hdrs(deadline_ms=9000))
        assert "fits" not in h.errors
        await h.finish("ok")
        assert h.order[-1] == "q1"
        await h.finish("q1")
        assert h.order[-1] == "q2"
        # Its deadline passes while it waits: rejected when its turn comes.
        clock.now += 8.5
        await h.finish("q2")
        assert h.errors["fits"].code == "deadline_unmeetable"
        assert sched.queue_depths() == {}
        labels = {"model": "m", "policy": "slo_aware", "outcome": "rejected_deadline"}
        assert _sample(metrics, "sagellm_gateway_scheduler_decisions_total", labels) == 3

    run(main())


def test_client_gone_while_queued_leaves_the_queue():
    async def main():
        sched, reg, _ = _setup([_record(0)])
        h = Harness(sched, reg)
        gone = asyncio.Event()

        async def receive():
            await gone.wait()
            return {"type": "http.disconnect"}

        await h.arrive("first")
        await h.arrive("quitter", receive=receive)
        await h.arrive("stayer")
        gone.set()
        await _yield()
        assert h.errors["quitter"].status == 499
        assert await h.drain("first") == ["stayer"]

    run(main())


def test_waiters_get_no_engine_when_every_engine_turns_unhealthy():
    async def main():
        sched, reg, _ = _setup([_record(0)])
        h = Harness(sched, reg)
        await h.arrive("first")
        await h.arrive("waiting")
        backend = reg.backends["e0000000"]
        reg.mark_failure(backend, "down", fatal=True)
        await asyncio.wait_for(h.tasks[-1], 5)  # the dispatch tick notices
        assert h.order == ["first", "waiting"]
        assert h.tickets["waiting"].backend is None  # the proxy answers 503 no_ready_engine
        await h.finish("first")
        await h.finish("waiting")

    run(main())


# -- engine choice ---------------------------------------------------------------------


def test_per_engine_limit_from_the_spec_overrides_the_default():
    async def main():
        sched, reg, _ = _setup([_record(0, max_inflight=3), _record(1)], routing="least_loaded")
        h = Harness(sched, reg)
        for i in range(5):
            await h.arrive(f"r{i}")
        assert len(h.order) == 4 and sched.queue_depths() == {"m": 1}
        ids = [h.tickets[label].backend.id for label in h.order]
        assert ids.count("e0000000") == 3 and ids.count("e0000001") == 1

    run(main())


def test_cost_prefers_cheap_engines_while_they_have_room():
    async def main():
        records = [_record(0, cost=2.0), _record(1, cost=0.5), _record(2, cost=0.5)]
        sched, reg, _ = _setup(records, scheduling="cost", max_inflight_per_engine=2)
        h = Harness(sched, reg)
        for i in range(7):
            await h.arrive(f"r{i}")
        ids = [h.tickets[label].backend.id for label in h.order]
        # The two cheap engines fill first (4 slots), then the expensive one, then the queue.
        assert sorted(ids[:4]) == ["e0000001", "e0000001", "e0000002", "e0000002"]
        assert ids[4:] == ["e0000000", "e0000000"]
        assert sched.queue_depths() == {"m": 1}
        # A cheap slot frees: the waiter takes it, not the expensive engine's.
        freed = h.order[0]
        await h.finish(freed)
        assert h.tickets["r6"].backend.id == h.tickets[freed].backend.id

    run(main())


def test_without_cost_policy_routing_spreads_over_all_engines():
    async def main():
        records = [_record(0, cost=2.0), _record(1, cost=0.5)]
        sched, reg, _ = _setup(records, scheduling="fifo", max_inflight_per_engine=2)
        h = Harness(sched, reg)
        for i in range(2):
            await h.arrive(f"r{i}")
        assert {h.tickets[x].backend.id for x in h.order} == {"e0000000", "e0000001"}

    run(main())


def test_length_routing_waits_for_its_own_role():
    async def main():
        records = [_record(0, role="prefill"), _record(1, role="decode")]
        sched, reg, _ = _setup(records, routing="length", length_threshold_chars=50)
        h = Harness(sched, reg)
        long_text = "y" * 200
        await h.arrive("long1", body=_chat(long_text))
        await h.arrive("long2", body=_chat(long_text))  # prefill full: waits
        await h.arrive("short1", body=_chat("hi"))  # decode free: goes past the long one
        assert h.order == ["long1", "short1"]
        assert h.tickets["long1"].backend.role == "prefill"
        assert h.tickets["short1"].backend.role == "decode"
        await h.arrive("short2", body=_chat("hi"))
        await h.finish("short1")  # a decode slot frees: the short waiter, not long2
        assert h.order[-1] == "short2"
        await h.finish("long1")
        assert h.order[-1] == "long2" and h.tickets["long2"].backend.role == "prefill"

    run(main())


# -- adaptive --------------------------------------------------------------------------


def test_adaptive_choice_rules():
    one, two = (lambda: 1), (lambda: 2)
    yes, no = (lambda: True), (lambda: False)
    kw = {"utilization": 0.9, "costs_vary": no}
    assert adaptive_choice("fifo", waiting=3, classes=one, with_deadline=1, **kw)[0] == "slo_aware"
    assert adaptive_choice("fifo", waiting=3, classes=two, with_deadline=0, **kw)[0] == "priority"
    assert adaptive_choice("priority", waiting=3, classes=one, with_deadline=0, **kw)[0] == "fifo"
    light = {"classes": one, "with_deadline": 0, "waiting": 0}
    assert adaptive_choice("fifo", utilization=0.1, costs_vary=yes, **light)[0] == "cost"
    assert adaptive_choice("cost", utilization=0.7, costs_vary=yes, **light)[0] == "fifo"
    assert adaptive_choice("priority", utilization=0.1, costs_vary=no, **light)[0] == "priority"


def test_adaptive_switches_by_load_and_requests_and_logs_why(caplog):
    caplog.set_level(logging.INFO, logger="sagellm.gateway")

    async def main():
        clock = Clock()
        records = [_record(0, cost=2.0), _record(1, cost=0.5)]
        sched, reg, metrics = _setup(records, clock, scheduling="adaptive")
        h = Harness(sched, reg)
        # Idle, engines differ in cost: cost, and the first request goes to the cheap one.
        await h.arrive("a")
        assert sched.active == "cost"
        assert h.tickets["a"].backend.id == "e0000001"
        await h.arrive("b")  # the cheap one is full: spills to the expensive one
        assert h.tickets["b"].backend.id == "e0000000"
        # Both full: cost would only concentrate load -> fifo.
        clock.now += 2
        await h.arrive("low", headers=_hdrs("low"))
        assert sched.active == "fifo"
        # Two classes queued -> priority (after the dwell time).
        clock.now += 2
        await h.arrive("crit", headers=_hdrs("critical"))
        assert sched.active == "priority"
        # A queued request with a deadline -> slo_aware.
        clock.now += 2
        await h.arrive("slo", headers=_hdrs(deadline_ms=60_000))
        assert sched.active == "slo_aware"
        await h.finish("a")
        assert h.order[-1] == "slo"  # EDF: the only deadline goes first
        # Still within the dwell time: no switch however the queue changes.
        await h.finish("b")
        assert sched.active == "slo_aware" and h.order[-1] == "crit"
        clock.now += 2
        await h.finish("slo")
        await h.finish("crit")
        await h.finish("low")
        clock.now += 2
        await h.arrive("idle")  # nothing queued, low load -> back to cost
        assert sched.active == "cost"
        assert sched.switches == 5
        text = caplog.text
        assert "adaptive switched fifo -> cost" in text
        assert "adaptive switched cost -> fifo" in text and "spread load" in text
        assert "adaptive switched fifo -> priority" in text and "2 priority classes" in text
        assert "priority -> slo_aware" in text and "carry a deadline" in text
        labels = {"from_policy": "priority", "to_policy": "slo_aware"}
        assert _sample(metrics, "sagellm_gateway_scheduler_policy_switches_total", labels) == 1
        active = {"configured": "adaptive", "policy": "cost"}
        assert _sample(metrics, "sagellm_gateway_scheduler_active_policy", active) == 1

    run(main())


# -- config and body fields ------------------------------------------------------------


def test_config_validation():
    with pytest.raises(BadInput):
        GatewayConfig(scheduling="lottery").validate()
    with pytest.raises(BadInput):
        GatewayConfig(scheduling="fifo", max_queue=-1).validate()
    GatewayConfig(scheduling="adaptive", slo_reject=True).validate()


def test_strip_gateway_fields_keeps_vllm_integer_priority():
    body = {"priority": "critical", "slo_deadline_ms": 5, "x": 1}
    assert strip_gateway_fields(body) and body == {"x": 1}
    body = {"priority": 3}
    assert not strip_gateway_fields(body) and body == {"priority": 3}


# -- the whole gateway, in-process, in front of a hand-released upstream ----------------


@contextlib.asynccontextmanager
async def _gateway(tmp_path, upstream, **cfg):
    """The gateway app in-process, with one engine record `tiny` at `upstream`."""
    store = StateStore(tmp_path / "state.json")
    with store.transaction() as state:
        r = _record(0, name="tiny", port=upstream.port)
        state.engines[r.id] = r
    async with inprocess_gateway(
        tmp_path / "state.json", health_interval_s=30, admin_token="test", **cfg
    ) as (gateway, client):
        yield gateway, client


async def _until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


def test_gateway_priority_order_reaches_the_engine_and_fields_are_stripped(tmp_path):
    async def main():
        with FakeUpstream(held=True, echo=True) as upstream:
            async with _gateway(
                tmp_path, upstream, scheduling="priority", max_inflight_per_engine=1, max_queue=3
            ) as (gateway, client):

                def post(tag, priority=None, body_priority=None):
                    body = {"model": "tiny", "messages": [{"role": "user", "content": tag}]}
                    if body_priority is not None:
                        body["priority"] = body_priority
                        body["slo_deadline_ms"] = 100_000
                    headers = {"X-Priority": priority} if priority else {}
                    return asyncio.ensure_future(
                        client.post("/v1/chat/completions", json=body, headers=headers)
                    )

                first = post("first")
                await _until(lambda: len(upstream.bodies) == 1)
                waiting = [post("low", "low"), post("norm"), post("crit", body_priority="critical")]
                await _until(lambda: gateway.scheduler.queue_depths() == {"tiny": 3})
                over = await client.post(
                    "/v1/chat/completions",
                    json={"model": "tiny", "messages": [{"role": "user", "content": "over"}]},
                )
                assert over.status_code == 429
                assert over.json()["error"]["code"] == "queue_full"
                assert int(over.headers["retry-after"]) >= 1
                for n, tag in enumerate(("first", "crit", "norm", "low"), start=2):
                    upstream.release(tag)  # one finishes: exactly one waiter reaches the engine
                    if n <= 4:
                        await _until(lambda n=n: len(upstream.bodies) == n)
                responses = [await first, *[await w for w in waiting]]
                assert [r.status_code for r in responses] == [200] * 4
                assert [b["messages"][0]["content"] for b in upstream.bodies] == [
                    "first",
                    "crit",
                    "norm",
                    "low",
                ]
                crit = upstream.bodies[1]
                assert "priority" not in crit and "slo_deadline_ms" not in crit
                metrics = (await client.get("/metrics")).text
                assert 'sagellm_gateway_queue_depth{model="tiny"} 0.0' in metrics
                assert 'outcome="rejected_queue_full"' in metrics
                assert "sagellm_gateway_queue_wait_seconds_bucket" in metrics
                status = gateway.counters()["scheduling"]
                assert status["policy"] == "priority" and status["waiting"] == 0

    run(main())


def test_gateway_without_scheduler_still_strips_string_priority(tmp_path):
    async def main():
        with FakeUpstream(held=True, echo=True) as upstream:
            async with _gateway(tmp_path, upstream) as (gateway, client):
                assert gateway.scheduler is None
                upstream.release("a")
                body = {
                    "model": "tiny",
                    "messages": [{"role": "user", "content": "a"}],
                    "priority": "high",
                }
                resp = await client.post("/v1/chat/completions", json=body)
                assert resp.status_code == 200, resp.text
                assert "priority" not in upstream.bodies[0]
                assert json.loads(resp.text)["choices"][0]["message"]["content"] == "a"

    run(main())
