"""Gateway behaviour that needs failures on demand: fault injection with a fake upstream.

The fake (benchmarks/fake_upstream.py) stands in for an engine only here, where
the point is to isolate the gateway's own code: hot reload of the state file,
error statuses, retries after 5xx and refused connections, a stream that breaks
mid-way, client disconnects, auth, body limits, and the background lifecycle.
Real engines behind the gateway are covered in test_gateway_engines.py.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import httpx
import pytest
from conftest import sage, sage_json
from test_gateway_support import (
    add_engine_record,
    fake_upstream,
    free_port,
    remove_engine_record,
    running_gateway,
)

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}


def _wait(predicate, timeout: float = 5.0, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def _metric(text: str, prefix: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


def test_state_file_changes_are_picked_up_and_errors_are_openai_shaped(home):
    with running_gateway(home, "--max-body-mb", "0.01") as gw, fake_upstream() as (port, proc):
        assert httpx.get(gw.url + "/ready").status_code == 503
        assert httpx.get(gw.v1 + "/models").json()["data"] == []
        add_engine_record(home, "fake0001", port, proc.pid, label="f1")
        t0 = time.monotonic()
        assert _wait(lambda: httpx.post(gw.v1 + "/chat/completions", json=CHAT).status_code == 200)
        assert time.monotonic() - t0 < 3, "a new engine must be routable within seconds"
        assert httpx.get(gw.url + "/ready").status_code == 200
        models = httpx.get(gw.v1 + "/models").json()["data"]
        assert [m["id"] for m in models] == ["fake"]
        assert models[0]["engines"][0]["id"] == "fake0001"
        # The label reaches the same engine; the upstream sees its served name.
        r = httpx.post(gw.v1 + "/chat/completions", json={**CHAT, "model": "f1"})
        assert r.status_code == 200 and r.headers["x-sagellm-engine"] == "fake0001"

        r = httpx.post(gw.v1 + "/chat/completions", json={**CHAT, "model": "nope"})
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "model_not_found"
        assert "fake" in r.json()["error"]["message"]
        for bad in (b"{not json", b"[1, 2]", b"\xff\xfe"):
            r = httpx.post(gw.v1 + "/chat/completions", content=bad)
            assert r.status_code == 400, bad
            assert r.json()["error"]["type"] == "invalid_request_error"
        r = httpx.post(gw.v1 + "/embeddings", json={"model": "fake", "input": "x"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_endpoint"
        r = httpx.post(gw.v1 + "/chat/completions", content=b"x" * 20000)
        assert r.status_code == 413
        assert httpx.get(gw.v1 + "/chat/completions").status_code == 405

        remove_engine_record(home, "fake0001")
        assert _wait(lambda: httpx.post(gw.v1 + "/chat/completions", json=CHAT).status_code == 404)


def _engine_count(gw) -> int:
    return sum(len(m["engines"]) for m in httpx.get(gw.v1 + "/models").json()["data"])


def test_retry_on_refused_connection_and_5xx_then_unhealthy(home):
    with (
        fake_upstream() as (good_port, good),
        fake_upstream("--status", "500") as (bad_port, bad),
        running_gateway(home, "--routing", "round_robin", "--health-interval", "30") as gw,
    ):
        add_engine_record(home, "good0001", good_port, good.pid)
        # A record whose port nobody listens on (pid: a live process, so only the
        # connection fails).
        add_engine_record(home, "gone0001", free_port(), os.getpid())
        assert _wait(lambda: _engine_count(gw) == 2)
        codes = [httpx.post(gw.v1 + "/chat/completions", json=CHAT).status_code for _ in range(10)]
        assert codes == [200] * 10
        # Retry goes to another replica at most once, so add the 5xx one only now.
        add_engine_record(home, "bad00001", bad_port, bad.pid)
        assert _wait(lambda: _engine_count(gw) == 3)
        codes = [httpx.post(gw.v1 + "/chat/completions", json=CHAT).status_code for _ in range(10)]
        assert codes == [200] * 10
        metrics = httpx.get(gw.url + "/metrics").text
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
        routing = httpx.get(gw.v1 + "/management/status", headers=gw.admin).json()["routing"]
        assert {b["id"]: b["healthy"] for b in routing} == {
            "good0001": True,
            "bad00001": False,
            "gone0001": False,
        }


def test_5xx_from_the_only_engine_is_passed_through_and_none_healthy_is_503(home):
    with (
        fake_upstream("--status", "500") as (port, proc),
        running_gateway(home, "--health-interval", "30", "--failure-threshold", "2") as gw,
    ):
        add_engine_record(home, "bad00001", port, proc.pid)
        assert _wait(lambda: httpx.get(gw.url + "/ready").status_code == 200)
        r = httpx.post(gw.v1 + "/chat/completions", json=CHAT)
        assert r.status_code == 500 and r.json()["error"]["message"] == "injected failure"
        httpx.post(gw.v1 + "/chat/completions", json=CHAT)
        r = httpx.post(gw.v1 + "/chat/completions", json=CHAT)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "no_ready_engine"
        assert httpx.get(gw.url + "/ready").status_code == 503


def test_stream_broken_midway_ends_with_an_error_event(home):
    with (
        fake_upstream("--break-after", "3") as (port, proc),
        running_gateway(home) as gw,
    ):
        add_engine_record(home, "brk00001", port, proc.pid)
        assert _wait(lambda: httpx.get(gw.url + "/ready").status_code == 200)
        with httpx.stream("POST", gw.v1 + "/chat/completions", json={**CHAT, "stream": True}) as r:
            assert r.status_code == 200
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert len(events) == 5
        assert '"error"' in events[3] and events[4] == "data: [DONE]"


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


def test_api_key_and_admin_token(home):
    with (
        fake_upstream() as (port, proc),
        running_gateway(home, "--api-key", "k1", "--admin-token", "a1") as gw,
    ):
        add_engine_record(home, "fake0001", port, proc.pid)
        assert _wait(lambda: httpx.get(gw.url + "/ready").status_code == 200)
        url = gw.v1 + "/chat/completions"
        assert httpx.post(url, json=CHAT).status_code == 401
        assert httpx.post(url, json=CHAT, headers={"Authorization": "Bearer no"}).status_code == 401
        assert httpx.post(url, json=CHAT, headers={"Authorization": "Bearer k1"}).status_code == 200
        assert httpx.get(gw.v1 + "/models").status_code == 401
        mgmt = gw.v1 + "/management/engines"
        assert httpx.get(mgmt, headers={"Authorization": "Bearer k1"}).status_code == 401
        r = httpx.get(mgmt, headers={"Authorization": "Bearer a1"})
        assert r.status_code == 200 and r.json()[0]["id"] == "fake0001"
        assert httpx.get(gw.url + "/health").status_code == 200


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


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/embeddings"])
def test_other_endpoints_pass_through(home, path):
    with fake_upstream() as (port, proc), running_gateway(home) as gw:
        add_engine_record(home, "fake0001", port, proc.pid, name="m1")
        add_engine_record(home, "emb00001", port, proc.pid, name="e1", kind="embedding")
        assert _wait(lambda: httpx.get(gw.url + "/ready").status_code == 200)
        body = {"model": "m1", "prompt": "x"} if "compl" in path else {"model": "e1", "input": "x"}
        r = httpx.post(gw.url + path, json=body)
        assert r.status_code == 200
        assert r.headers["x-sagellm-engine"] == ("fake0001" if "compl" in path else "emb00001")
