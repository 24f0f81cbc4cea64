"""The model scheduler (issue 20, item 2): its pure decisions (core/engines/scheduler.py) and, with
fake engines that honour vLLM's sleep mode (tests/fakes.py SleepyEngine), what the
gateway does with them: a request queued behind a busy neighbour waits and gets 200; a
model that can never fit gets a 503 at once naming who holds the memory."""

from __future__ import annotations

import asyncio

import pytest
from conftest import sage, sage_json
from fakes import SleepyEngine
from test_gateway_support import inprocess_gateway
from test_lifecycle_races import GATEWAY, _until, stand_in

from sagellm_cli.core.engines.scheduler import (
    BURST_GAP_S,
    MIN_RESIDENCY_S,
    PATIENCE_S,
    RAM_HEADROOM_GIB,
    Loaded,
    choose_victim,
    decide,
    keep_value,
    preflight,
    sleep_level,
)
from sagellm_cli.core.lifecycle import Status


def loaded(id: str, **fields) -> Loaded:
    fields.setdefault("frees_gib", 20.0)
    fields.setdefault("idle_s", 60.0)  # idle a minute: past any burst, unless a test says
    return Loaded(id=id, name=id, gpus=(0,), **fields)


# -- pure decisions ----------------------------------------------------------


@pytest.mark.parametrize("policy", ["cost", "lru"])
def test_an_engine_with_requests_in_flight_or_queued_is_never_the_victim(policy):
    busy = loaded("busy", refs=1, idle_s=1000)
    idle = loaded("idle", idle_s=1)
    assert choose_victim([busy, idle], policy).id == "idle"
    assert choose_victim([busy], policy) is None


@pytest.mark.parametrize(
    "protection, why",
    [({"pinned": True}, "pinned"), ({"leased_s": 600.0}, "leased for 600s more")],
)
def test_pinned_and_leased_engines_are_never_unloaded(protection, why):
    engine = loaded("kept", idle_s=10_000, **protection)
    assert engine.blocked == why
    assert choose_victim([engine], "cost") is None
    assert choose_victim([engine, loaded("other")], "cost").id == "other"


def test_cost_keeps_the_engine_that_is_needed_often_and_expensive_to_reload():
    # The planner was used a moment before the tool, but far more often: LRU evicts the
    # planner anyway, cost evicts the tool.
    planner = loaded("planner", idle_s=2.0, recent_uses=40, reload_s=0.5)
    tool = loaded("tool", idle_s=1.0, recent_uses=3, reload_s=0.5)
    assert choose_victim([planner, tool], "lru").id == "planner"
    assert choose_victim([planner, tool], "cost").id == "tool"


def test_cost_prefers_a_cheap_wake_to_a_cold_start_and_a_bigger_release():
    sleeps = loaded("sleeps", reload_s=0.5)
    cold = loaded("cold", reload_s=60.0)
    assert choose_victim([sleeps, cold], "cost").id == "sleeps"
    big, small = loaded("big", frees_gib=60.0), loaded("small", frees_gib=10.0)
    assert keep_value(big) < keep_value(small)
    assert choose_victim([small, big], "cost").id == "big"


def test_cost_keeps_the_frequent_planner_although_it_is_idle_longer():
    # Between two bursts the planner is idle longer than the tool that just answered;
    # the old idle discount made it the victim. Frequency keeps it.
    planner = loaded("planner", idle_s=3.0, recent_uses=60, reload_s=0.4)
    tool = loaded("tool", idle_s=0.5, recent_uses=30, reload_s=0.4)
    assert decide([planner, tool], "cost").victim.id == "tool"
    assert decide([planner, tool], "lru").victim.id == "planner"


def test_burst_first_waits_for_the_target_instead_of_evicting_the_idle_planner():
    planner = loaded("planner", idle_s=1.0, recent_uses=60)
    busy_tool = loaded("tool", refs=2, recent_uses=30)
    decision = decide([planner, busy_tool], "cost", waited_s=0.5)
    assert decision.victim is None and "waiting for tool" in decision.reason
    # LRU takes whoever is idle this instant: the planner.
    assert decide([planner, busy_tool], "lru").victim.id == "planner"
    # A burst still arriving (a request a moment ago, none in flight) also holds it.
    arriving = loaded("tool", idle_s=BURST_GAP_S / 2, recent_uses=30)
    assert decide([planner, arriving], "cost").victim is None
    assert decide([planner, loaded("tool", idle_s=BURST_GAP_S, recent_uses=30)]).victim.id == (
        "tool"
    )


def test_burst_first_drains_the_target_once_patience_runs_out():
    planner = loaded("planner", idle_s=1.0, recent_uses=60)
    busy_tool = loaded("tool", refs=2, recent_uses=30)
    decision = decide([planner, busy_tool], "cost", waited_s=PATIENCE_S)
    assert decision.victim.id == "tool" and decision.drain
    # An engine the supervisor is acting on (waking, probing) is never drained.
    acting = loaded("tool", busy=True, recent_uses=30)
    assert decide([planner, acting], "cost", waited_s=PATIENCE_S * 10).victim is None


def test_an_engine_just_woken_keeps_a_minimum_residency():
    planner = loaded("planner", idle_s=1.0, recent_uses=60)
    woken = loaded("tool", idle_s=1.0, recent_uses=5, resident_s=MIN_RESIDENCY_S / 2)
    for waited in (0.0, PATIENCE_S * 10):  # even past patience: it expires on its own
        decision = decide([planner, woken], "cost", waited_s=waited)
        assert decision.victim is None and "woken" in decision.reason
    later = loaded("tool", idle_s=1.0, recent_uses=5, resident_s=MIN_RESIDENCY_S)
    assert decide([planner, later], "cost").victim.id == "tool"


def test_the_decision_ranks_every_candidate_for_the_log():
    planner = loaded("planner", idle_s=1.0, recent_uses=60, reload_s=0.5)
    tool = loaded("tool", refs=1, recent_uses=3, reload_s=0.5)
    pinned = loaded("kept", pinned=True)
    decision = decide([planner, tool, pinned], "cost")
    assert [name for name, _, _ in decision.ranked] == ["tool", "planner"]
    assert decision.ranked[0][2] == "1 request(s) in flight or queued"
    assert decide([pinned], "cost").victim is None


def test_preflight_fits_when_unloading_busy_engines_would_make_room():
    busy = loaded("busy", refs=3)
    assert preflight("b", 30.0, 1, {0: 15.0}, [busy]).fits


def test_preflight_refuses_with_the_holders_and_which_are_pinned():
    pinned = loaded("planner", pinned=True, held_gib=60.0, frees_gib=59.0)
    leased = loaded("batch", leased_s=300.0, held_gib=30.0, frees_gib=29.0)
    verdict = preflight("tool", 40.0, 1, {0: 10.0}, [pinned, leased])
    assert not verdict.fits
    assert "'tool' needs 40.0 GiB" in verdict.reason
    assert "planner (60.0 GiB on GPU 0, pinned)" in verdict.reason
    assert "batch (30.0 GiB on GPU 0, leased for 300s more)" in verdict.reason
    assert "GPU 0: 10.0 GiB" in verdict.reason


def test_preflight_counts_gpus_for_tensor_parallel_models():
    free = {0: 40.0, 1: 5.0}
    assert preflight("m", 30.0, 1, free, []).fits
    assert not preflight("m", 30.0, 2, free, []).fits
    assert preflight("m", 30.0, 2, free, [Loaded("x", "x", (1,), frees_gib=30.0)]).fits


def test_sleep_level_from_free_host_ram():
    assert sleep_level(64.0, 16.0) == 1  # the weights fit in RAM: the fast wake
    assert sleep_level(16.0 + RAM_HEADROOM_GIB - 0.5, 16.0) == 2  # they don't: dropped
    assert sleep_level(None, 16.0) == sleep_level(64.0, None) == 1  # unknown: vLLM's default


# -- through the gateway, with fake engines on a mock GPU ---------------------

CHAT = {"max_tokens": 2}


def chat(model: str, content: str = "hi") -> dict:
    return {**CHAT, "model": model, "messages": [{"role": "user", "content": content}]}


@pytest.fixture
def mock_30(monkeypatch):
    # Two 20 GiB engines: one awake and one asleep (1 GiB) fit; both awake do not.
    monkeypatch.setenv("SAGELLM_MOCK_GPUS", "1x30")


def test_a_request_queued_behind_a_busy_neighbour_waits_and_gets_200(home, mock_30):
    """B sleeps; A serves a long request. A request for B needs A's memory: it waits in
    B's queue (A is never slept mid-request), and once A's request ends A sleeps, B
    wakes, and both requests get 200."""

    async def main():
        with SleepyEngine(held=True) as fa, SleepyEngine() as fb:
            sleepy = {"keep_alive": 3600, "unload": "sleep"}
            with (
                stand_in(home, fa, Status.READY, engine_id="enginea1", name="a", **sleepy),
                stand_in(home, fb, Status.SLEEPING, engine_id="engineb1", name="b", **sleepy),
            ):
                async with inprocess_gateway(home / "state.json", **GATEWAY) as (gw, client):
                    first = asyncio.create_task(
                        client.post("/v1/chat/completions", json=chat("a", "long"))
                    )
                    await _until(lambda: fa.seen, "A's request")
                    second = asyncio.create_task(
                        client.post("/v1/chat/completions", json=chat("b"))
                    )
                    await _until(
                        lambda: gw.supervisor.status()["queued"].get("engineb1"), "B's queue"
                    )
                    await asyncio.sleep(0.3)  # rounds pass: A must not be slept mid-request
                    assert "/sleep" not in fa.calls and not second.done()
                    fa.release("long")
                    assert (await first).status_code == 200
                    response = await second
                    assert response.status_code == 200, response.text
                    assert fa.calls == ["/sleep"] and fb.calls == ["/wake_up"]

    asyncio.run(main())


def test_a_model_that_cannot_fit_beside_pinned_engines_is_503_at_once(home, mock_30):
    """A is pinned: the request for sleeping B can never get room. 503 at once (no wait
    for --wake-timeout), OpenAI-shaped, naming A as pinned; A is not touched."""

    async def main():
        with (
            SleepyEngine() as fa,
            SleepyEngine() as fb,
            stand_in(home, fa, Status.READY, engine_id="enginea1", name="a", pin=True),
            stand_in(home, fb, Status.SLEEPING, engine_id="engineb1", name="b", unload="sleep"),
        ):
            config = {**GATEWAY, "wake_timeout_s": 300}
            async with inprocess_gateway(home / "state.json", **config) as (_, client):
                response = await asyncio.wait_for(
                    client.post("/v1/chat/completions", json=chat("b")), 60
                )
                assert response.status_code == 503, response.text
                error = response.json()["error"]
                assert error["code"] == "model_does_not_fit"
                assert error["type"] == "service_unavailable"
                assert "enginea1 (20.0 GiB on GPU 0, pinned)" in error["message"]
                assert fa.calls == [] and fb.calls == []

    asyncio.run(main())


# -- the lease command -------------------------------------------------------


def test_engine_hold_sets_and_ends_a_lease_and_rejects_bad_input(home, mock_30):
    with SleepyEngine() as fake, stand_in(home, fake, Status.READY, engine_id="enginea1", name="a"):
        record = sage_json("llm", "engine", "hold", "enginea1", "--for", "10m", home=home)
        assert record["held_until"] is not None
        record = sage_json("llm", "engine", "hold", "enginea1", "--for", "0", home=home)
        assert record["held_until"] is None
        missing = sage("llm", "engine", "hold", "nosuch", "--for", "10m", home=home)
        assert missing.returncode == 3 and "Traceback" not in missing.stderr
        bad = sage("llm", "engine", "hold", "enginea1", "--for", "soon", home=home)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr
