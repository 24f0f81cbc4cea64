"""Real engines behind a real gateway: two tiny vLLM replicas and one MiniLM embedder.

One module-scoped gateway (`sage llm serve` as a subprocess) is started first;
the two vLLM replicas (labels r1 with role prefill, r2 with role decode, same
served name `tiny`) are started afterwards with `sage llm engine start`, so the
gateway must discover them through the state file. The embedding engine is
started through the management API. Strategy tests start extra short-lived
gateways on the same engines. The kill -9 failover test runs last.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import signal
import threading
import time

import httpx
import psutil
import pytest
from conftest import needs_st, needs_vllm, start_engines_at_once, stop_all_engines
from test_gateway_support import running_gateway

from sagellm_cli.gateway.routing.strategies import STRATEGIES

pytestmark = [pytest.mark.engines, needs_vllm]

MSG = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def gw_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("gateway") / "sagellm"
    home.mkdir(parents=True)
    yield home
    stop_all_engines(home)


@pytest.fixture(scope="module")
def gateway(gw_home):
    with running_gateway(gw_home, "--health-interval", "1") as gw:
        yield gw


@pytest.fixture(scope="module")
def replicas(gw_home, gateway, tiny_model):
    """Two replicas started in parallel; returns {label: record} and when they were ready."""
    common = ["--served-model-name", "tiny", "--max-model-len", "512", "--kv-cache-gb",
              "0.0625", "--timeout", "400"]  # fmt: skip
    records = start_engines_at_once(
        gw_home,
        tiny_model,
        {"r1": ["--role", "prefill", *common], "r2": ["--role", "decode", *common]},
    )
    return {"records": records, "ready_at": time.monotonic()}


@pytest.fixture(scope="module")
def embedding(gateway, gw_home):
    """The embedding engine, started through the management API."""
    r = httpx.post(
        gateway.v1 + "/management/engines",
        json={"model": "all-MiniLM-L6-v2", "engine_kind": "embedding", "label": "minilm"},
        headers=gateway.admin,
        timeout=300,
    )
    assert r.status_code == 201, r.text
    record = r.json()
    yield record
    httpx.delete(
        f"{gateway.v1}/management/engines/{record['id']}", timeout=60, headers=gateway.admin
    )


def _ids(replicas) -> dict[str, str]:
    return {label: rec["id"] for label, rec in replicas["records"].items()}


def _chat(url: str, model: str = "tiny", **kw) -> httpx.Response:
    body = {"model": model, "messages": MSG, "max_tokens": 2, **kw}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60)


def test_engines_started_while_gateway_runs_become_routable(gateway, replicas):
    deadline = replicas["ready_at"] + 3
    while True:
        models = httpx.get(gateway.v1 + "/models").json()["data"]
        tiny = [m for m in models if m["id"] == "tiny"]
        if tiny and sum(e["healthy"] for e in tiny[0]["engines"]) == 2:
            break
        assert time.monotonic() < deadline, f"replicas not routable within 3 s: {models}"
        time.sleep(0.1)
    assert {e["id"] for e in tiny[0]["engines"]} == set(_ids(replicas).values())
    assert httpx.get(gateway.url + "/ready").status_code == 200


def test_openai_client_chat_completions_and_streaming(gateway, replicas):
    import openai

    client = openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0)
    chat = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=8)
    assert chat.choices[0].finish_reason in ("length", "stop")
    assert chat.usage.completion_tokens > 0 and chat.model == "tiny"

    comp = client.completions.create(model="tiny", prompt="def main(", max_tokens=8)
    assert comp.choices[0].finish_reason in ("length", "stop")
    assert comp.usage.prompt_tokens > 0

    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=MSG,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len(chunks) >= 3
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)

    pieces = list(client.completions.create(model="tiny", prompt="x", max_tokens=6, stream=True))
    assert len(pieces) >= 2

    # Raw SSE framing passes through: `data: ` events ending with [DONE].
    with httpx.stream(
        "POST",
        gateway.v1 + "/chat/completions",
        json={"model": "tiny", "messages": MSG, "max_tokens": 4, "stream": True},
        timeout=60,
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


@needs_st
def test_openai_client_embeddings(gateway, embedding):
    import openai

    client = openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0)
    for name in ("minilm", "all-MiniLM-L6-v2"):
        out = client.embeddings.create(model=name, input=["a cat sits", "a dog runs"])
        assert len(out.data) == 2 and len(out.data[0].embedding) == 384


def test_unified_client(gateway, replicas):
    from sagellm_cli.client import GatewayError, UnifiedInferenceClient

    with UnifiedInferenceClient(gateway.url) as client:
        assert "tiny" in client.models()
        text = client.chat("hi", model="tiny", max_tokens=4)
        assert isinstance(text, str)
        assert client.last_response["usage"]["completion_tokens"] > 0
        with pytest.raises(GatewayError) as exc:
            client.chat("hi", model="nope")
        assert exc.value.status == 404


@needs_st
def test_unified_client_embed(gateway, embedding):
    from sagellm_cli.client import UnifiedInferenceClient

    with UnifiedInferenceClient(gateway.url + "/v1") as client:
        vectors = client.embed(["a", "b", "c"], model="minilm")
    assert len(vectors) == 3 and len(vectors[0]) == 384


def test_routing_by_model_name_label_and_id(gateway, replicas):
    ids = _ids(replicas)
    for label, engine_id in ids.items():
        for name in (label, engine_id):
            r = _chat(gateway.url, model=name)
            assert r.status_code == 200, r.text
            assert r.headers["x-sagellm-engine"] == engine_id
            assert r.json()["model"] == "tiny"
    seen = {_chat(gateway.url).headers["x-sagellm-engine"] for _ in range(4)}
    assert seen == set(ids.values())


def test_errors_404_400_401(gateway, replicas, gw_home):
    import openai

    client = openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="nope", messages=MSG)
    assert "tiny" in str(exc.value)
    r = httpx.post(gateway.v1 + "/chat/completions", content=b"{nope")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    # An engine's own 4xx passes through unchanged (vLLM rejects a too long request).
    r = _chat(gateway.url, max_tokens=100000)
    assert r.status_code == 400
    with running_gateway(gw_home, "--api-key", "sekret") as keyed:
        bad = openai.OpenAI(base_url=keyed.v1, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
        good = openai.OpenAI(base_url=keyed.v1, api_key="sekret", max_retries=0)
        assert good.chat.completions.create(model="tiny", messages=MSG, max_tokens=2).choices


def _distribution(url: str, n: int, **kw) -> collections.Counter:
    return collections.Counter(_chat(url, **kw).headers["x-sagellm-engine"] for _ in range(n))


def test_strategy_distributions(gw_home, replicas):
    """Each strategy over the two replicas, each behind its own short-lived gateway."""
    ids = _ids(replicas)
    both = set(ids.values())
    long_prompt = "one shared system prompt that is long enough " * 8
    for strategy in STRATEGIES:
        with running_gateway(
            gw_home, "--routing", strategy, "--length-threshold", "200", "--prefix-chars", "64"
        ) as gw:
            if strategy == "round_robin":
                picks = [_chat(gw.url).headers["x-sagellm-engine"] for _ in range(10)]
                assert collections.Counter(picks) == {i: 5 for i in both}
                assert all(a != b for a, b in zip(picks, picks[1:], strict=False))
            elif strategy in ("least_loaded", "random", "power_of_two"):
                assert set(_distribution(gw.url, 16)) == both, strategy
                if strategy == "least_loaded":
                    # Concurrent load spreads over both replicas.
                    with concurrent.futures.ThreadPoolExecutor(8) as pool:
                        heads = list(
                            pool.map(
                                lambda _: _chat(gw.url, max_tokens=16).headers["x-sagellm-engine"],
                                range(16),
                            )
                        )
                    counts = collections.Counter(heads)
                    assert set(counts) == both and min(counts.values()) >= 4, counts
            elif strategy == "affinity":
                homes = {}
                for user in (f"user-{i}" for i in range(16)):
                    seen = _distribution(gw.url, 3, user=user)
                    assert len(seen) == 1, (user, seen)
                    homes[user] = next(iter(seen))
                assert set(homes.values()) == both
                # The X-Session-Id header works like `user`.
                r = [
                    httpx.post(
                        gw.v1 + "/chat/completions",
                        json={"model": "tiny", "messages": MSG, "max_tokens": 2},
                        headers={"X-Session-Id": "s-1"},
                    ).headers["x-sagellm-engine"]
                    for _ in range(4)
                ]
                assert len(set(r)) == 1
            elif strategy in ("prefix", "kv"):
                # These replicas publish no KV events: `kv` routes as `prefix` does.
                shared = [
                    _chat(
                        gw.url,
                        messages=[{"role": "user", "content": long_prompt + f" question {i}"}],
                    ).headers["x-sagellm-engine"]
                    for i in range(8)
                ]
                assert len(set(shared)) == 1
                distinct = {
                    _chat(
                        gw.url, messages=[{"role": "user", "content": f"{i} other prefix " * 6}]
                    ).headers["x-sagellm-engine"]
                    for i in range(16)
                }
                assert distinct == both
            elif strategy == "length":
                longs = _distribution(
                    gw.url, 4, messages=[{"role": "user", "content": "word " * 60}]
                )
                shorts = _distribution(gw.url, 4)
                assert set(longs) == {ids["r1"]}, "long prompts go to role prefill"
                assert set(shorts) == {ids["r2"]}, "short prompts go to role decode"
            elif strategy == "pd":
                # No KV connector on these replicas: no prefill step, and every request
                # goes to the decode engine, which computes the prompt itself.
                answers = _distribution(
                    gw.url, 6, messages=[{"role": "user", "content": "x " * 60}]
                )
                assert set(answers) == {ids["r2"]}, "pd without a connector: decode only"
            else:
                pytest.fail(f"no distribution check for strategy {strategy!r}")


def test_metrics_content(gateway, replicas):
    for _ in range(3):
        assert _chat(gateway.url, max_tokens=4).status_code == 200
    with httpx.stream(
        "POST",
        gateway.v1 + "/chat/completions",
        json={
            "model": "tiny",
            "messages": MSG,
            "max_tokens": 4,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        timeout=60,
    ) as r:
        list(r.iter_lines())
    text = httpx.get(gateway.url + "/metrics").text
    ids = _ids(replicas)
    for name in (
        "sagellm_gateway_requests_total",
        "sagellm_gateway_request_duration_seconds_bucket",
        "sagellm_gateway_time_to_first_token_seconds_bucket",
        'sagellm_gateway_tokens_total{direction="in",model="tiny"}',
        'sagellm_gateway_tokens_total{direction="out",model="tiny"}',
        "sagellm_gateway_requests_in_flight",
        "sagellm_gateway_engine_healthy",
    ):
        assert name in text, name
    for engine_id in ids.values():
        assert f'engine="{engine_id}"' in text
        assert (
            f'sagellm_gateway_engine_healthy{{engine="{engine_id}",kind="llm",model="tiny"}} 1.0'
            in text
        )
    assert 'status="200"' in text


@needs_st
def test_management_api_lists_status_and_stops(gateway, embedding, gw_home):
    engines = httpx.get(gateway.v1 + "/management/engines", headers=gateway.admin).json()
    assert embedding["id"] in {e["id"] for e in engines}
    status = httpx.get(gateway.v1 + "/management/status", headers=gateway.admin).json()
    assert {"gateway", "engines", "gpu", "routing"} <= set(status)
    assert status["gateway"]["requests"] > 0
    assert "gpus" in httpx.get(gateway.v1 + "/management/gpu", headers=gateway.admin).json()
    bad = httpx.post(
        gateway.v1 + "/management/engines", json={"model": "x", "bogus": 1}, headers=gateway.admin
    )
    assert bad.status_code == 400 and "bogus" in bad.json()["error"]["message"]
    assert (
        httpx.delete(gateway.v1 + "/management/engines/nosuch", headers=gateway.admin).status_code
        == 404
    )

    # While the DELETE blocks in a worker thread, inference keeps flowing.
    result = {}
    thread = threading.Thread(
        target=lambda: result.setdefault(
            "r",
            httpx.delete(
                f"{gateway.v1}/management/engines/{embedding['id']}",
                timeout=60,
                headers=gateway.admin,
            ),
        )
    )
    thread.start()
    assert _chat(gateway.url).status_code == 200
    thread.join(60)
    assert result["r"].status_code == 200 and result["r"].json()["status"] == "stopped"
    assert not psutil.pid_exists(embedding["pid"]) or (
        psutil.Process(embedding["pid"]).status() == psutil.STATUS_ZOMBIE
    )
    r = httpx.post(gateway.v1 + "/embeddings", json={"model": "minilm", "input": "x"})
    assert r.status_code == 404


def test_failover_when_a_replica_is_killed(gateway, replicas):
    """kill -9 one replica's process group under load: no client sees an error."""
    ids = _ids(replicas)
    victim = replicas["records"]["r2"]
    errors: list[str] = []
    served_after: list[str] = []
    stop = threading.Event()
    killed_at: list[float] = []

    def worker():
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                r = client.post(
                    gateway.v1 + "/chat/completions",
                    json={"model": "tiny", "messages": MSG, "max_tokens": 8},
                )
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                elif killed_at and time.monotonic() > killed_at[0] + 5:
                    served_after.append(r.headers["x-sagellm-engine"])

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        os.killpg(victim["pgid"], signal.SIGKILL)
        killed_at.append(time.monotonic())
        time.sleep(8)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert errors == []
    assert served_after and set(served_after) == {ids["r1"]}
    # The gateway reaps the killed replica (status failed): its label is no longer served.
    r = _chat(gateway.url, model="r2")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    # Streams on the surviving replica are unaffected.
    with httpx.stream(
        "POST",
        gateway.v1 + "/chat/completions",
        json={"model": "tiny", "messages": MSG, "max_tokens": 4, "stream": True},
        timeout=60,
    ) as resp:
        assert resp.status_code == 200
        events = [line for line in resp.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
