"""Routing strategies and the registry, as pure units (no processes, no network)."""

from __future__ import annotations

import collections
import time

from sagellm_cli.core.records import EngineRecord
from sagellm_cli.core.state import State
from sagellm_cli.gateway.config import GatewayConfig
from sagellm_cli.gateway.routing.backend import Backend
from sagellm_cli.gateway.routing.registry import Registry
from sagellm_cli.gateway.routing.strategies import (
    STRATEGIES,
    Affinity,
    LeastLoaded,
    Length,
    PowerOfTwo,
    Prefix,
    Random,
    RoundRobin,
    RouteInfo,
    make_strategy,
)


def _record(i: int, *, name="m", role="general", status="ready", kind="llm", label=None):
    return EngineRecord(
        id=f"e{i:07d}",
        kind=kind,
        runtime="vllm",
        model=f"/models/{name}",
        served_model_name=name,
        host="127.0.0.1",
        port=9000 + i,
        label=label,
        status=status,
        pid=None,
        created_at=time.time() + i,
        role=role,
    )


def _backends(n: int, **kw) -> list[Backend]:
    return [Backend(_record(i, **kw)) for i in range(n)]


def _chat(text: str, user: str | None = None) -> RouteInfo:
    return RouteInfo({"messages": [{"role": "user", "content": text}]}, user)


def test_every_documented_strategy_exists():
    assert set(STRATEGIES) == {
        "round_robin",
        "least_loaded",
        "random",
        "power_of_two",
        "affinity",
        "prefix",
        "length",
        "kv",
        "pd",
    }


def test_round_robin_alternates_exactly():
    bs = _backends(3)
    rr = RoundRobin()
    picks = [rr.choose(bs, _chat("x")).id for _ in range(9)]
    assert collections.Counter(picks) == {b.id: 3 for b in bs}
    assert picks[0] != picks[1] != picks[2]


def test_least_loaded_prefers_idle_and_rotates_ties():
    bs = _backends(3)
    bs[0].inflight, bs[1].inflight, bs[2].inflight = 5, 1, 3
    assert LeastLoaded().choose(bs, _chat("x")) is bs[1]
    for b in bs:
        b.inflight = 0
    ll = LeastLoaded()
    assert {ll.choose(bs, _chat("x")).id for _ in range(3)} == {b.id for b in bs}


def test_random_uses_every_replica():
    bs = _backends(2)
    counts = collections.Counter(Random().choose(bs, _chat("x")).id for _ in range(400))
    assert all(150 < c < 250 for c in counts.values())


def test_power_of_two_never_picks_the_busiest_of_two():
    bs = _backends(2)
    bs[0].inflight = 10
    p2 = PowerOfTwo()
    assert all(p2.choose(bs, _chat("x")) is bs[1] for _ in range(50))


def test_affinity_is_sticky_and_spreads_users():
    bs = _backends(4)
    aff = Affinity()
    for user in ("alice", "bob", "carol"):
        first = aff.choose(bs, _chat("x", user))
        assert all(aff.choose(bs, _chat("y", user)) is first for _ in range(20))
    spread = collections.Counter(aff.choose(bs, _chat("x", f"u{i}")).id for i in range(400))
    assert len(spread) == 4 and min(spread.values()) > 50


def test_affinity_moves_only_the_removed_replicas_users():
    bs = _backends(4)
    aff = Affinity()
    before = {f"u{i}": aff.choose(bs, _chat("x", f"u{i}")) for i in range(200)}
    gone = bs[2]
    rest = [b for b in bs if b is not gone]
    for user, backend in before.items():
        after = aff.choose(rest, _chat("x", user))
        if backend is not gone:
            assert after is backend


def test_prefix_groups_shared_prefixes_under_a_load_bound():
    bs = _backends(3)
    pre = Prefix(chars=64, load_factor=1.25)
    system = "You are a helpful assistant. " * 4
    home = pre.choose(bs, _chat(system + "question one"))
    assert all(pre.choose(bs, _chat(system + f"question {i}")) is home for i in range(20))
    spread = {pre.choose(bs, _chat(f"{i} different prompt " * 5)).id for i in range(60)}
    assert len(spread) == 3
    # A hot prefix whose replica is overloaded spills over.
    home.inflight = 50
    assert pre.choose(bs, _chat(system + "more")) is not home


def test_length_splits_by_role_and_falls_back():
    prefill = Backend(_record(0, role="prefill"))
    decode = Backend(_record(1, role="decode"))
    length = Length(threshold_chars=100)
    assert length.choose([prefill, decode], _chat("a" * 101)) is prefill
    assert length.choose([prefill, decode], _chat("short")) is decode
    assert length.choose([decode], _chat("a" * 500)) is decode
    assert length.choose([prefill], _chat("short")) is prefill
    assert Length(10).choose([prefill, decode], RouteInfo({"prompt": "x" * 11}, None)) is prefill


def test_the_registry_builds_strategies_from_the_config():
    cfg = GatewayConfig(routing="prefix", prefix_chars=7, model_routing={"long": "length"},
                        length_threshold_chars=9)  # fmt: skip
    reg = Registry(cfg)
    assert reg._strategy_for("llm", "m").chars == 7
    assert reg._strategy_for("llm", "long").threshold == 9
    assert make_strategy("length", length_threshold_chars=9).threshold == 9


def test_registry_groups_names_kinds_and_keeps_counters():
    state = State()
    a = _record(0, name="tiny", label="r1")
    b = _record(1, name="tiny", label="r2")
    e = _record(2, name="emb", kind="embedding")
    s = _record(3, name="tiny", status="stopped")
    for r in (a, b, e, s):
        state.engines[r.id] = r
    reg = Registry(GatewayConfig())
    reg.load(state)
    assert {x.id for x in reg.group("llm", "tiny").backends} == {a.id, b.id}
    assert [x.id for x in reg.group("llm", "r2").backends] == [b.id]
    assert reg.group("llm", a.id).backends[0].id == a.id
    assert reg.group("llm", "emb") is None and reg.other_kind("llm", "emb") == "embedding"
    assert reg.model_names("llm") == ["tiny"]
    reg.backends[a.id].inflight = 3
    reg.load(state)
    assert reg.backends[a.id].inflight == 3


def test_registry_health_threshold_and_recovery():
    state = State()
    r = _record(0, name="tiny")
    state.engines[r.id] = r
    reg = Registry(GatewayConfig(failure_threshold=3))
    reg.load(state)
    backend = reg.backends[r.id]
    group = reg.group("llm", "tiny")
    reg.mark_failure(backend, "x")
    reg.mark_failure(backend, "x")
    assert group.healthy == [backend]
    reg.mark_failure(backend, "x")
    assert group.healthy == []
    reg.mark_success(backend)
    assert group.healthy == [backend]


def test_starting_engine_waits_for_a_health_check():
    state = State()
    r = _record(0, status="starting")
    state.engines[r.id] = r
    reg = Registry(GatewayConfig())
    reg.load(state)
    assert reg.group("llm", "m").healthy == []


def test_the_seeds_policy_names_are_accepted():
    """Seeds 001/002 call them load_balanced, locality and cost_optimized."""
    from conftest import invoke

    config = GatewayConfig(routing="load_balanced", model_routing={"m": "locality"},
                           scheduling="cost_optimized")  # fmt: skip
    config.validate()
    assert (config.routing, config.model_routing, config.scheduling) == (
        "least_loaded",
        {"m": "prefix"},
        "cost",
    )
    bad = invoke("llm", "serve", "--routing", "fastest", "--port", "1")
    assert bad.exit_code == 2 and "unknown routing strategy" in bad.stderr
