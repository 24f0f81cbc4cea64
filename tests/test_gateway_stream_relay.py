"""Streams through a real `sage llm serve` (uvicorn), where engine bytes are relayed from the
upstream connection's callback straight to the client's transport (transport.DirectWriter).

The in-process tests (httpx.ASGITransport) take the ASGI fallback path; these check that
the direct path keeps what the gateway promises: every byte in order, auth, admission,
token and TTFT metrics from the streamed usage, the mid-stream error event, and reading
paused (not buffered without bound) while a client reads slowly.
"""

from __future__ import annotations

import contextlib
import socket
import time

import httpx
from fakes import PROMPT_TOKENS
from test_gateway_support import add_engine_record, fake_upstream, running_gateway

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True}
USAGE = {"stream_options": {"include_usage": True}}


def _wait(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def _sample(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@contextlib.contextmanager
def _slow_client(gw):
    """A raw connection that has sent one streamed chat request and reads nothing yet: its
    modest receive window (set before connecting) lets the gateway's buffers fill."""
    payload = httpx.Request("POST", gw.v1 + "/chat/completions", json=CHAT).content
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.connect(("127.0.0.1", gw.port))
        sock.sendall(head + payload)
        yield sock


def _events(resp: httpx.Response) -> list[str]:
    return [line for line in resp.iter_lines() if line.startswith("data: ")]


def test_a_relayed_stream_is_intact_authorised_admitted_and_counted(home):
    with (
        fake_upstream("--chunks", "40", "--itl-ms", "1") as (port, proc),
        running_gateway(home, "--api-key", "k1", "--scheduling", "priority") as gw,
    ):
        add_engine_record(home, "rel00001", port, proc.pid)
        assert _wait(lambda: httpx.get(gw.url + "/ready").status_code == 200)
        url = gw.v1 + "/chat/completions"
        body = {**CHAT, **USAGE}
        assert httpx.post(url, json=body).status_code == 401
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r:
            direct = _events(r)
        auth = {"Authorization": "Bearer k1", "X-Priority": "high"}
        with httpx.stream("POST", url, json=body, headers=auth) as r:
            assert r.status_code == 200
            assert r.headers["x-sagellm-engine"] == "rel00001"
            assert r.headers["content-type"].startswith("text/event-stream")
            relayed = _events(r)
        assert relayed == direct  # 40 tokens, the usage chunk and [DONE], byte for byte
        assert len(relayed) == 42 and relayed[-1] == "data: [DONE]"

        metrics = httpx.get(gw.url + "/metrics").text
        tokens = "sagellm_gateway_tokens_total"
        assert _sample(metrics, tokens, model="fake", direction="in") == PROMPT_TOKENS
        assert _sample(metrics, tokens, model="fake", direction="out") == 40
        ttft = "sagellm_gateway_time_to_first_token_seconds_count"
        assert _sample(metrics.replace(ttft + " ", ttft + "{} "), ttft, model="fake") == 1
        doc = httpx.get(gw.v1 + "/management/metrics?window=60", headers=gw.admin).json()
        assert doc["total"]["completed"] == 1
        assert doc["total"]["ttft_ms"]["count"] == 1
        assert doc["total"]["admission"]["admitted"] == 1
        assert doc["total"]["output_tokens_per_s"] > 0


def test_a_stream_that_breaks_midway_ends_with_an_error_event(home):
    with (
        fake_upstream("--chunks", "10", "--break-after", "3") as (port, proc),
        running_gateway(home) as gw,
    ):
        add_engine_record(home, "brk00001", port, proc.pid)
        assert _wait(lambda: httpx.get(gw.url + "/ready").status_code == 200)
        with httpx.stream("POST", gw.v1 + "/chat/completions", json=CHAT) as r:
            assert r.status_code == 200
            events = _events(r)
        assert len(events) == 5
        assert '"error"' in events[3] and "mid-stream" in events[3]
        assert events[4] == "data: [DONE]"


def test_a_slow_reader_gets_every_byte_while_the_engine_waits(home):
    # ~3 MB of events, written by the engine as fast as it can; the client reads nothing
    # for a while, so the gateway must stop reading from the engine, then resume.
    chunks = 20000
    with (
        fake_upstream("--chunks", str(chunks)) as (port, proc),
        running_gateway(home) as gw,
    ):
        add_engine_record(home, "slw00001", port, proc.pid)
        assert _wait(lambda: httpx.get(gw.url + "/ready").status_code == 200)
        with _slow_client(gw) as sock:
            time.sleep(1.5)  # not reading: the gateway's buffers fill and it pauses
            data = bytearray()
            while block := sock.recv(65536):
                data += block
        raw = bytes(data)
        assert raw.startswith(b"HTTP/1.1 200")
        assert raw.count(b"data: {") == chunks
        assert raw.rstrip().endswith(b"0")  # the chunked terminator: the response completed
        assert b"data: [DONE]" in raw


def test_a_client_that_leaves_while_the_relay_is_paused_ends_it(home):
    """A client that reads nothing, so that the relay pauses on its full buffers, then
    disconnects: the paused relay ends at once (no task waits for the disconnect), the
    request leaves the in-flight count and the engine's connection is dropped."""
    with (
        fake_upstream("--chunks", "200000") as (port, proc),
        running_gateway(home) as gw,
    ):
        add_engine_record(home, "lft00001", port, proc.pid)
        assert _wait(lambda: httpx.get(gw.url + "/ready").status_code == 200)
        metric = "sagellm_gateway_requests_in_flight"
        with _slow_client(gw):
            assert _wait(
                lambda: _sample(httpx.get(gw.url + "/metrics").text, metric, engine="lft00001") == 1
            )
            time.sleep(1.0)  # not reading: the gateway pauses reading from the engine
        # The socket is closed: the relay must end now, not after 200,000 events.
        assert _wait(
            lambda: _sample(httpx.get(gw.url + "/metrics").text, metric, engine="lft00001") == 0,
            5,
        )
        import psutil

        assert _wait(
            lambda: (
                not [
                    c
                    for c in psutil.Process(proc.pid).net_connections()
                    if c.status == "ESTABLISHED"
                ]
            ),
            5,
        )
        # The gateway goes on serving.
        assert httpx.get(gw.url + "/health").status_code == 200
