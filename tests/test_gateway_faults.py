"""Gateway behaviour that needs failures on demand: fault injection with a fake upstream.

The fake (tests/fakes.py) stands in for an engine only here, where the point is to
isolate the gateway's own code: hot reload of the state file, error statuses,
retries after 5xx and refused connections, a stream that breaks mid-way, auth and
the other endpoints run the Gateway app in-process (`inprocess_gateway`, through
`httpx.ASGITransport`) in front of a fake in a thread. What needs real sockets and
processes stays end to end (`running_gateway`): a client that disconnects
mid-stream, the body limit over HTTP, a busy port and the background lifecycle.
Real engines behind the gateway are covered in test_gateway_engines.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import httpx
import pytest
from conftest import sage, sage_json
from fakes import FakeUpstream
from test_gateway_support import (
    ADMIN,
    add_engine_record,
    fake_upstream,
    free_port,
    inprocess_gateway,
    remove_engine_record,
    running_gateway,
)

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
CHAT_PATH = "/v1/chat/completions"


def _wait(predicate, timeout: float = 5.0, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


async def _until(predicate, timeout: float = 5.0, step: float = 0.02):
    """`predicate` is called until its (awaited) value is true or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(step)


async def _is(value, expected) -> bool:
    return (await value) == expected


def _metric(text: str, prefix: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


# -- in-process: the gateway's logic ------------------------------------------------


def test_state_file_changes_are_picked_up_and_errors_are_openai_shaped(local_home):
    async def main():
        with FakeUpstream() as fake:
            async with inprocess_gateway(
                local_home / "state.json", max_body_bytes=int(0.01 * 1024 * 1024)
            ) as (_, gw):

                async def status(path=CHAT_PATH, body=CHAT):
                    return (await gw.post(path, json=body)).status_code

                assert (await gw.get("/ready")).status_code == 503
                assert (await gw.get("/v1/models")).json()["data"] == []
                add_engine_record(local_home, "fake0001", fake.port, os.getpid(), label="f1")
                t0 = time.monotonic()
                assert await _until(lambda: _is(status(), 200))
                assert time.monotonic() - t0 < 3, "a new engine must be routable within seconds"
                assert (await gw.get("/ready")).status_code == 200
                models = (await gw.get("/v1/models")).json()["data"]
                # Every name that routes is listed: the served name and the label.
                assert [m["id"] for m in models] == ["fake", "f1"]
                assert [m["owned_by"] for m in models] == ["fake0001", "fake0001"]
                assert models[1]["root"] == "fake"
                assert models[0]["engines"][0]["id"] == "fake0001"
                # The label reaches the same engine; the upstream sees its served name.
                r = await gw.post(CHAT_PATH, json={**CHAT, "model": "f1"})
                assert r.status_code == 200 and r.headers["x-sagellm-engine"] == "fake0001"
                assert fake.bodies[-1]["model"] == "fake"

                r = await gw.post(CHAT_PATH, json={**CHAT, "model": "nope"})
                assert r.status_code == 404
                assert r.json()["error"]["code"] == "model_not_found"
                assert "fake" in r.json()["error"]["message"]
                for bad in (b"{not json", b"[1, 2]", b"\xff\xfe"):
                    r = await gw.post(CHAT_PATH, content=bad)
                    assert r.status_code == 400, bad
                    assert r.json()["error"]["type"] == "invalid_request_error"
                r = await gw.post("/v1/embeddings", json={"model": "fake", "input": "x"})
                assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_endpoint"
                r = await gw.post(CHAT_PATH, content=b"x" * 20000)
                assert r.status_code == 413
                assert (await gw.get(CHAT_PATH)).status_code == 405

                remove_engine_record(local_home, "fake0001")
                assert await _until(lambda: _is(status(), 404))

    asyncio.run(main())


async def _engine_count(gw) -> int:
    models = (await gw.get("/v1/models")).json()["data"]
    return len({e["id"] for m in models for e in m["engines"]})


def test_retry_on_refused_connection_and_5xx_then_unhealthy(local_home):
    async def main():
        with FakeUpstream() as good, FakeUpstream(status=500) as bad:
            async with inprocess_gateway(
                local_home / "state.json", routing="round_robin", health_interval_s=30
            ) as (_, gw):
                add_engine_record(local_home, "good0001", good.port, os.getpid())
                # A record whose port nobody listens on (pid: a live process, so only the
                # connection fails).
                add_engine_record(local_home, "gone0001", free_port(), os.getpid())
                assert await _until(lambda: _is(_engine_count(gw), 2))
                codes = [(await gw.post(CHAT_PATH, json=CHAT)).status_code for _ in range(10)]
                assert codes == [200] * 10
                # Retry goes to another replica at most once, so add the 5xx one only now.
                add_engine_record(local_home, "bad00001", bad.port, os.getpid())
                assert await _until(lambda: _is(_engine_count(gw), 3))
                codes = [(await gw.post(CHAT_PATH, json=CHAT)).status_code for _ in range(10)]
                assert codes == [200] * 10
                metrics = (await gw.get("/metrics")).text
                assert _metric(metrics, "sagellm_gateway_retries_total") >= 2
                assert (
                    'sagellm_gateway_engine_healthy{engine="bad00001",kind="llm",model="fake"} 0.0'
                    in metrics
                )
                assert (
                    'sagellm_gateway_engine_healthy{engine="gone0001",kind="llm",model="fake"} 0.0'
                    in metrics
                )
                assert (
                    'sagellm_gateway_engine_healthy{engine="good0001",kind="llm",model="fake"} 1.0'
                    in metrics
                )
                status = await gw.get("/v1/management/status", headers=ADMIN)
                routing = status.json()["routing"]
                assert {b["id"]: b["healthy"] for b in routing} == {
                    "good0001": True,
                    "bad00001": False,
                    "gone0001": False,
                }

    asyncio.run(main())


def test_5xx_from_the_only_engine_is_passed_through_and_none_healthy_is_503(local_home):
    async def main():
        with FakeUpstream(status=500) as fake:
            async with inprocess_gateway(
                local_home / "state.json", health_interval_s=30, failure_threshold=2
            ) as (_, gw):
                add_engine_record(local_home, "bad00001", fake.port, os.getpid())

                async def ready():
                    return (await gw.get("/ready")).status_code

                assert await _until(lambda: _is(ready(), 200))
                r = await gw.post(CHAT_PATH, json=CHAT)
                assert r.status_code == 500 and r.json()["error"]["message"] == "injected failure"
                await gw.post(CHAT_PATH, json=CHAT)
                r = await gw.post(CHAT_PATH, json=CHAT)
                assert r.status_code == 503
                assert r.json()["error"]["code"] == "no_ready_engine"
                assert await ready() == 503

    asyncio.run(main())


def test_stream_broken_midway_ends_with_an_error_event(local_home):
    async def main():
        with FakeUpstream(break_after=3) as fake:
            async with inprocess_gateway(local_home / "state.json") as (_, gw):
                add_engine_record(local_home, "brk00001", fake.port, os.getpid())

                async def ready():
                    return (await gw.get("/ready")).status_code

                assert await _until(lambda: _is(ready(), 200))
                body = {**CHAT, "stream": True}
                async with gw.stream("POST", CHAT_PATH, json=body) as r:
                    assert r.status_code == 200
                    events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
                assert len(events) == 5
                assert '"error"' in events[3] and events[4] == "data: [DONE]"

    asyncio.run(main())


def test_api_key_and_admin_token(local_home):
    async def main():
        with FakeUpstream() as fake:
            async with inprocess_gateway(
                local_home / "state.json", api_key="k1", admin_token="a1"
            ) as (_, gw):
                add_engine_record(local_home, "fake0001", fake.port, os.getpid())

                async def ready():
                    return (await gw.get("/ready")).status_code

                assert await _until(lambda: _is(ready(), 200))

                async def code(method, path, token=None, **kw):
                    headers = {"Authorization": f"Bearer {token}"} if token else {}
                    return (await gw.request(method, path, headers=headers, **kw)).status_code

                assert await code("POST", CHAT_PATH, json=CHAT) == 401
                assert await code("POST", CHAT_PATH, "no", json=CHAT) == 401
                assert await code("POST", CHAT_PATH, "k1", json=CHAT) == 200
                assert await code("GET", "/v1/models") == 401
                mgmt = "/v1/management/engines"
                assert await code("GET", mgmt, "k1") == 401
                r = await gw.get(mgmt, headers={"Authorization": "Bearer a1"})
                assert r.status_code == 200 and r.json()[0]["id"] == "fake0001"
                assert await code("GET", "/health") == 200

    asyncio.run(main())


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/embeddings"])
def test_other_endpoints_pass_through(local_home, path):
    async def main():
        with FakeUpstream() as fake:
            async with inprocess_gateway(local_home / "state.json") as (_, gw):
                pid = os.getpid()
                add_engine_record(local_home, "fake0001", fake.port, pid, name="m1")
                add_engine_record(
                    local_home, "emb00001", fake.port, pid, name="e1", kind="embedding"
                )

                async def ready():
                    return (await gw.get("/ready")).status_code

                assert await _until(lambda: _is(ready(), 200))
                compl = "compl" in path
                body = {"model": "m1", "prompt": "x"} if compl else {"model": "e1", "input": "x"}
                r = await gw.post(path, json=body)
                assert r.status_code == 200
                assert r.headers["x-sagellm-engine"] == ("fake0001" if compl else "emb00001")
                assert fake.seen[-1]["path"] == path

    asyncio.run(main())


# -- end to end: real sockets and processes ------------------------------------------


def test_body_limit_over_real_http(home):
    with running_gateway(home, "--max-body-mb", "0.01") as gw:
        url = gw.v1 + "/chat/completions"
        assert httpx.post(url, content=b"x" * 20000).status_code == 413
        # A chunked body (no Content-Length) is cut off at the limit as well.
        r = httpx.post(url, content=iter([b"x" * 4096] * 5))
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        # Under the limit the body is read (and refused for what it is, not its size).
        assert httpx.post(url, content=b"x" * 10000).status_code == 400
        assert httpx.get(gw.url + "/health").status_code == 200


def test_client_disconnect_cancels_the_upstream_stream(home):
    with (
        fake_upstream("--chunks", "2000", "--delay-ms", "10") as (port, proc),
        running_gateway(home) as gw,
    ):
        add_engine_record(home, "slow0001", port, proc.pid)
        assert _wait(lambda: httpx.get(gw.url + "/ready").status_code == 200)
        inflight = 'sagellm_gateway_requests_in_flight{engine="slow0001",model="fake"}'
        with httpx.stream("POST", gw.v1 + "/chat/completions", json={**CHAT, "stream": True}) as r:
            lines = r.iter_lines()
            next(lines)
            assert _metric(httpx.get(gw.url + "/metrics").text, inflight) == 1
        # The stream would last 20 s; the gateway must drop it as soon as we leave.
        assert _wait(lambda: _metric(httpx.get(gw.url + "/metrics").text, inflight) == 0, 3)
        conns = [
            c
            for c in __import__("psutil").Process(proc.pid).net_connections()
            if c.status == "ESTABLISHED"
        ]
        assert conns == []


def test_refuses_a_busy_port(home):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        r = sage("llm", "serve", "--port", str(port), home=home, timeout=60)
        assert r.returncode == 4 and "in use" in r.stderr
        r = sage("llm", "serve", "--port", str(port), "--background", home=home, timeout=60)
        assert r.returncode == 4
    r = sage("llm", "serve", "--routing", "fastest", home=home, timeout=60)
    assert r.returncode == 2


def test_stop_ends_a_gateway_running_in_the_foreground(home):
    """A gateway started in the foreground shares its caller's process group (here this
    test's), so it is recorded without a group: `--stop` must end that process itself,
    and nothing else in the group, before it says "stopped"."""
    import subprocess
    import sys

    from conftest import _sage_env

    port = free_port()
    gateway = subprocess.Popen(
        [sys.executable, "-m", "sagellm_cli", "llm", "serve", "--port", str(port)],
        env=_sage_env(home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert _wait(lambda: sage_json("llm", "serve", "--status", home=home)["running"], 60)
        record = sage_json("llm", "serve", "--status", home=home)
        assert record["pid"] == gateway.pid and record["pgid"] is None
        out = sage_json("llm", "serve", "--stop", home=home)
        assert out["stopped"] and out["gateway"]["pid"] == gateway.pid
        assert gateway.wait(15) is not None  # it exited: it did not just lose its record
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait()


def test_background_start_status_stop_and_reconcile(home):
    port = free_port()
    try:
        rec = sage_json("llm", "serve", "--background", "--port", str(port), home=home)
        assert rec["port"] == port and rec["pgid"] == rec["pid"]
        assert httpx.get(rec["url"] + "/health").status_code == 200
        assert (home / "logs" / "gateway.log").exists()
        st = sage_json("llm", "serve", "--status", home=home)
        assert st["running"] and st["healthy"] and st["pid"] == rec["pid"]
        again = sage("llm", "serve", "--background", "--port", str(free_port()), home=home)
        assert again.returncode == 4 and "already runs" in again.stderr
        out = sage_json("llm", "serve", "--stop", home=home)
        assert out["stopped"] and out["gateway"]["pid"] == rec["pid"]
        assert _wait(lambda: not _alive(rec["pid"]))
        assert sage_json("llm", "serve", "--stop", home=home)["stopped"] is False
        assert sage_json("llm", "serve", "--status", home=home) == {"running": False}

        # A gateway killed -9 is reconciled away like a dead engine.
        rec = sage_json("llm", "serve", "--background", "--port", str(port), home=home)
        os.kill(rec["pid"], signal.SIGKILL)
        assert _wait(lambda: not _alive(rec["pid"]))
        assert sage_json("llm", "serve", "--status", home=home) == {"running": False}
    finally:
        sage("llm", "serve", "--stop", home=home)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_an_embedding_request_without_an_embedding_engine_says_how_to_start_one(local_home):
    """Only a chat engine runs: an embedding request is a 404 naming what is missing and the
    command that starts it, not a 400 about a `model` the client could not have known."""

    async def main():
        with FakeUpstream() as fake:
            async with inprocess_gateway(local_home / "state.json") as (_, gw):
                add_engine_record(local_home, "fake0001", fake.port, os.getpid())

                async def chat_status():
                    return (await gw.post(CHAT_PATH, json=CHAT)).status_code

                assert await _until(lambda: _is(chat_status(), 200))
                for body, names in (({"input": "x"}, "no embedding engine"),
                                    ({"model": "minilm", "input": "x"}, "'minilm'")):  # fmt: skip
                    r = await gw.post("/v1/embeddings", json=body)
                    assert r.status_code == 404, r.text
                    error = r.json()["error"]
                    assert error["code"] == "model_not_found"
                    assert names in error["message"]
                    assert "--engine-kind embedding" in error["message"]

    asyncio.run(main())
