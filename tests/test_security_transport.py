"""Transport limits of `sage llm serve` (gateway/http/transport.py, gateway/http/server.py).

Against a real gateway subprocess started under a 1,024 soft open-file limit (where
1,100 idle connections used to lock everyone out), with the default limits: 2,048
connections, 64 KiB of request head, 10 s to deliver a request head, 5 s keep-alive.
Idle and half-open connections must not lock real clients out, an oversized head gets
431 without being buffered, and connections that never finish a request head are closed.
Limits below their defaults (a small cap, a short body deadline) are set with their
`sage llm serve` options.
"""

from __future__ import annotations

import contextlib
import resource
import selectors
import socket
import threading
import time

import httpx
import psutil
import pytest
from test_gateway_support import (
    add_engine_record,
    fake_upstream,
    free_port,
    running_gateway,
)

from sagellm_cli.gateway.config import GatewayConfig
from sagellm_cli.gateway.http.server import FD_RESERVE, NOFILE_TARGET

DEFAULTS = GatewayConfig()
MAX_HEAD = DEFAULTS.max_header_bytes
HEADER_TIMEOUT = DEFAULTS.header_timeout_s
KEEP_ALIVE = DEFAULTS.keep_alive_timeout_s
MAX_CONNECTIONS = DEFAULTS.max_connections


@pytest.fixture(scope="module")
def nofile():
    """Raise this process's open-file limit for the floods; restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE_TARGET if hard == resource.RLIM_INFINITY else min(hard, NOFILE_TARGET)
    if want < 4096:
        pytest.skip(f"hard open-file limit {hard} is too low for the connection floods")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    try:
        yield want
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, nofile):
    """One gateway for the module, started with a soft open-file limit of 1,024."""
    home = tmp_path_factory.mktemp("transport") / "sagellm"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.ExitStack() as stack:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # inherited by the gateway
        try:
            gw = stack.enter_context(running_gateway(home))
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        yield gw


def _host(gw) -> bytes:
    return f"127.0.0.1:{gw.port}".encode()


def _connect(gw, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def _read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the gateway sends until it closes (a reset counts as closed)."""
    sock.settimeout(timeout)
    out = b""
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        while chunk := sock.recv(65536):
            out += chunk
    return out


def _health(gw, timeout: float = 5.0) -> int:
    return httpx.get(gw.url + "/health", timeout=timeout).status_code


def test_open_file_limit_is_raised_to_the_hard_limit(gateway):
    soft, hard = psutil.Process(gateway.proc.pid).rlimit(psutil.RLIMIT_NOFILE)
    assert soft == (NOFILE_TARGET if hard == resource.RLIM_INFINITY else min(hard, NOFILE_TARGET))
    assert soft > 1024


def test_oversized_header_gets_431_at_once_without_being_buffered(gateway):
    proc = psutil.Process(gateway.proc.pid)
    rss_before = proc.memory_info().rss
    peak = [rss_before]
    done = threading.Event()

    def watch():
        while not done.is_set():
            with contextlib.suppress(psutil.Error):
                peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    sock = _connect(gateway)
    sent = [0]

    def send():  # 32 MiB of one header value; the gateway cuts us off long before
        chunk = b"a" * (1 << 20)
        with contextlib.suppress(OSError):
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: " + _host(gateway) + b"\r\nX-Big: ")
            for _ in range(32):
                sock.sendall(chunk)
                sent[0] += len(chunk)
            sock.sendall(b"\r\n\r\n")

    watcher = threading.Thread(target=watch, daemon=True)
    sender = threading.Thread(target=send, daemon=True)
    try:
        watcher.start()
        started = time.monotonic()
        sender.start()
        response = _read_until_closed(sock, timeout=10)
        elapsed = time.monotonic() - started
        sender.join(10)
    finally:
        sock.close()
        done.set()
        watcher.join(5)
    assert response.startswith(b"HTTP/1.1 431 "), response[:200]
    assert b"connection: close" in response.lower()
    assert elapsed < 5, elapsed
    assert sent[0] < 32 << 20, "the gateway read the whole 32 MiB header"
    assert peak[0] - rss_before < 64 << 20, (rss_before, peak[0])
    assert _health(gateway) == 200


def test_oversized_request_line_gets_431(gateway):
    with _connect(gateway) as sock:
        path = b"/health?" + b"q" * (MAX_HEAD + 1024)
        sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: " + _host(gateway) + b"\r\n\r\n")
        assert _read_until_closed(sock, timeout=5).startswith(b"HTTP/1.1 431 ")


def test_heads_under_the_limit_large_bodies_and_pipelining_still_work(gateway):
    # A head just under the limit is served.
    big = "a" * (MAX_HEAD - 4096)
    assert httpx.get(gateway.url + "/health", headers={"x-big": big}).status_code == 200
    # A 2 MiB body in the head's first segments is a body, not a head: not 431.
    body = b'{"model": "none", "messages": [{"role": "user", "content": "' + b"b" * (2 << 20)
    body += b'"}]}'
    response = httpx.post(
        gateway.v1 + "/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert response.status_code not in (400, 431), response.text[:200]
    # 2,000 pipelined requests (~94 KB in one send): each head has its own budget.
    one = b"GET /health HTTP/1.1\r\nHost: " + _host(gateway) + b"\r\n\r\n"
    last = b"GET /health HTTP/1.1\r\nHost: " + _host(gateway) + b"\r\nConnection: close\r\n\r\n"
    with _connect(gateway) as sock:
        sock.sendall(one * 1999 + last)
        assert _read_until_closed(sock, timeout=10).count(b"HTTP/1.1 200 ") == 2000


def test_1100_half_open_connections_do_not_lock_clients_out(gateway):
    socks = []
    try:
        for i in range(1100):
            sock = _connect(gateway)
            socks.append(sock)
            if i % 2:  # half send part of a request head and stop; half send nothing
                sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: " + _host(gateway) + b"\r\nX-")
        time.sleep(0.3)
        for _ in range(5):
            started = time.monotonic()
            assert _health(gateway) == 200
            assert time.monotonic() - started < 2
    finally:
        for sock in socks:
            sock.close()


def test_past_the_connection_cap_the_longest_idle_connections_are_evicted(gateway, nofile):
    gateway_nofile = psutil.Process(gateway.proc.pid).rlimit(psutil.RLIMIT_NOFILE)[0]
    cap = min(MAX_CONNECTIONS, (gateway_nofile - FD_RESERVE) // 2)
    socks = []
    try:
        for _ in range(cap + 200):
            socks.append(_connect(gateway))
        time.sleep(0.3)
        assert _health(gateway) == 200
        assert psutil.Process(gateway.proc.pid).num_fds() < cap + 100
        # The first connections, the longest idle, were the ones closed.
        assert _read_until_closed(socks[0], timeout=2) == b""
        assert _read_until_closed(socks[1], timeout=2) == b""
    finally:
        for sock in socks:
            sock.close()


def test_slowloris_silent_and_idle_keep_alive_connections_are_closed(gateway):
    """A head still incomplete after 10 s is closed, even one that keeps trickling bytes."""
    silent = _connect(gateway)
    partial = _connect(gateway)
    trickle = _connect(gateway)
    keep_alive = _connect(gateway)
    socks = {"silent": silent, "partial": partial, "trickle": trickle, "keep_alive": keep_alive}
    selector = selectors.DefaultSelector()
    try:
        partial.sendall(b"GET /health HTTP/1.1\r\nHost: " + _host(gateway) + b"\r\n")
        trickle.sendall(b"GET /health HTTP/1.1\r\nHost: " + _host(gateway) + b"\r\nX-Slow: ")
        keep_alive.sendall(b"GET /health HTTP/1.1\r\nHost: " + _host(gateway) + b"\r\n\r\n")
        reply = keep_alive.recv(4096)
        assert reply.startswith(b"HTTP/1.1 200 "), reply
        started = time.monotonic()
        for name, sock in socks.items():
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, name)
        closed: dict[str, float] = {}
        next_trickle = started
        while len(closed) < len(socks) and time.monotonic() - started < HEADER_TIMEOUT + 5:
            now = time.monotonic()
            if "trickle" not in closed and now >= next_trickle:
                with contextlib.suppress(OSError):  # closed under us: seen by the selector
                    trickle.send(b"a")
                next_trickle = now + 0.5
            for key, _ in selector.select(timeout=0.1):
                try:
                    data = key.fileobj.recv(65536)
                except (ConnectionResetError, BrokenPipeError):
                    data = b""
                if not data:
                    closed[key.data] = time.monotonic() - started
                    selector.unregister(key.fileobj)
        assert set(closed) == set(socks), closed
        assert KEEP_ALIVE - 1 <= closed["keep_alive"] <= KEEP_ALIVE + 2, closed
        for name in ("silent", "partial", "trickle"):
            assert HEADER_TIMEOUT - 1 <= closed[name] <= HEADER_TIMEOUT + 3, closed
        assert _health(gateway) == 200
    finally:
        selector.close()
        for sock in socks.values():
            sock.close()


def _closed_within(socks: list[socket.socket], seconds: float) -> list[int]:
    """Indexes of the sockets (not yet closed here) that the gateway closes within seconds."""
    closed = []
    with selectors.DefaultSelector() as selector:
        for i, sock in enumerate(socks):
            if sock.fileno() != -1:
                selector.register(sock, selectors.EVENT_READ, i)
        deadline = time.monotonic() + seconds
        while selector.get_map() and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(timeout=left):
                with contextlib.suppress(OSError):
                    assert key.fileobj.recv(65536) == b""
                selector.unregister(key.fileobj)
                key.fileobj.close()
                closed.append(key.data)
    return closed


def _slow_post(gw) -> socket.socket:
    """A chat request whose head is complete and whose body stops after one byte."""
    sock = _connect(gw)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + _host(gw) + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
    )
    return sock


def test_slow_bodies_are_evicted_at_the_cap_and_closed_at_the_body_deadline(tmp_path):
    with running_gateway(
        tmp_path / "sagellm", "--max-connections", "8", "--body-timeout", "2"
    ) as gw:
        socks = []
        try:
            for _ in range(8):
                socks.append(_slow_post(gw))
            time.sleep(0.3)
            started = time.monotonic()
            assert _health(gw) == 200  # took the place of one of the slow clients
            closed = _closed_within(socks, 0.5)
            assert len(closed) == 1, closed
            closed += _closed_within(socks, 5)  # the body deadline (2 s) got the others
            assert sorted(closed) == list(range(8)), closed
            assert time.monotonic() - started < 5
            assert _health(gw) == 200
        finally:
            for sock in socks:
                sock.close()


def test_at_the_cap_with_every_request_in_the_gateway_new_connections_get_503(tmp_path):
    home = tmp_path / "sagellm"
    chat = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    with (
        running_gateway(home, "--max-connections", "4") as gw,
        fake_upstream("--delay-ms", "2000") as (port, proc),
    ):
        add_engine_record(home, "fake0001", port, proc.pid)
        deadline = time.monotonic() + 10
        while httpx.get(gw.v1 + "/models").json()["data"] == []:
            assert time.monotonic() < deadline, "the engine record was not picked up"
            time.sleep(0.1)
        statuses = []

        def chat_once():
            statuses.append(httpx.post(gw.v1 + "/chat/completions", json=chat, timeout=10))

        threads = [threading.Thread(target=chat_once) for _ in range(4)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.7)  # all four wait on the upstream: none is the client's fault
            with _connect(gw) as sock:
                reply = _read_until_closed(sock, timeout=5)
            assert reply.startswith(b"HTTP/1.1 503 "), reply[:200]
            assert b"Too many connections" in reply
        finally:
            for thread in threads:
                thread.join(15)
        assert [r.status_code for r in statuses] == [200] * 4
        assert _health(gw) == 200


def test_a_slow_reader_keeps_its_response_but_a_stalled_one_is_closed():
    """In-process, as a large response needs no engine: the head deadline must not cut off a
    client still reading a response at its own pace, only one that stopped reading."""
    import uvicorn

    from sagellm_cli.gateway.http import transport

    body = b"x" * (8 << 20)

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    guard = transport.ConnectionGuard(64, MAX_HEAD, header_timeout_s=1.0)
    port = free_port()
    config = uvicorn.Config(
        app, port=port, http=transport.protocol_class(guard), lifespan="off", log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    socks = []

    def get() -> socket.socket:
        sock = socket.socket()
        socks.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.settimeout(5)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        return sock

    def read_all(sock: socket.socket, pause: float = 0.0) -> int:
        got = 0
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(64 * 1024):
                got += len(chunk)
                time.sleep(pause)
        return got

    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "in-process server did not start"
            time.sleep(0.05)
        slow, stalled = get(), get()
        stalled.recv(64 * 1024)  # then reads nothing more for a while
        started = time.monotonic()
        slow.settimeout(2)  # read at a few MB/s: takes several head deadlines
        assert read_all(slow, pause=0.02) > len(body)  # then closed, idle
        assert time.monotonic() - started > 2 * guard.header_timeout_s
        assert read_all(stalled) < len(body)  # aborted with output still unsent
        assert guard.counts["timed_out"] == 2
    finally:
        for sock in socks:
            sock.close()
        server.should_exit = True
        thread.join(10)
