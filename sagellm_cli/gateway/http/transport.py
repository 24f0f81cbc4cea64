"""Connection-level limits for the gateway's HTTP server (uvicorn's httptools protocol).

uvicorn's httptools protocol has none of these (measured with uvicorn 0.54, httptools 0.9):
a connection that sends nothing, or part of a request head, is never closed (the
keep-alive timer only starts after a response); a request head is buffered whole,
whatever its size; and `limit_concurrency` counts idle connections too, so idle ones
turn every real request into a 503 instead of being closed. `GuardedHttpToolsProtocol`
adds, per server (`ConnectionGuard`):

* a head limit: more than `max_header_bytes` received for one request head (request
  line and headers) -> 431 and the connection is closed. The parser never gets more
  than the limit, so a 32 MiB header costs what a 64 KiB one does;
* a head deadline: a connection with no request in progress (just opened, idle after
  a response, or part-way through sending a head) is aborted once it has been so for
  `header_timeout_s`: silent connections and slowloris trickles alike. Idle keep-alive
  connections are closed sooner by uvicorn's own keep-alive timeout. A client still
  reading the end of a response is not idle while it makes progress;
* a body deadline: a request whose body the app is still waiting for `body_timeout_s`
  after its head is aborted (slow-POST trickles; 0 = no deadline);
* a connection cap: at `max_connections`, a new connection evicts those that have waited
  longest on their client (for a head or for a body the app is waiting for); only when
  every connection waits on the gateway itself (app, queue, upstream) is the new one
  refused with 503. Slow or idle clients never lock others out.

It also offers the proxy a direct writer for streamed bodies (`direct_writer`): the
proxy relays an engine's SSE bytes from the upstream protocol's callback straight to
this connection's transport, instead of waking the request's task and going through
ASGI `send` once per chunk (docs/gateway.md, *Where the time goes*).

Hot path: one extra Python call per received segment and one per request
(`on_message_complete`), a few hundred nanoseconds. The deadlines are enforced by one
sweep per server every second or so, which notices a new request on a connection by
its `cycle` object changing, so nothing per request records the time.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("sagellm.gateway")

_431 = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: 32\r\n"
    b"connection: close\r\n\r\n"
    b"Request header fields too large\n"
)
_503 = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: 21\r\n"
    b"retry-after: 1\r\n"
    b"connection: close\r\n\r\n"
    b"Too many connections\n"
)
_REPORT_EVERY_S = 60.0
_UNSET = object()
# The scope extension under which a request's direct writer factory is found.
DIRECT_WRITE = "sagellm.direct_write"


class DirectWriter:
    """Writes a started, chunked response body straight to the client's transport.

    Equivalent to ASGI `http.response.body` messages with `more_body: True` (the same
    chunked framing uvicorn writes), but callable from a protocol callback with no task
    switch. The response is still started and finished through ASGI `send`, so uvicorn's
    own state (keep-alive, completion) stays right.
    """

    __slots__ = ("_cycle", "_protocol", "_write", "_flow")

    def __init__(self, cycle, protocol: GuardedHttpToolsProtocol):
        self._cycle = cycle
        self._protocol = protocol
        self._write = cycle.transport.write
        self._flow = cycle.flow

    def on_client_lost(self, callback) -> bool:
        """Call `callback()` from the connection's `connection_lost` if the client goes away
        (None: no longer); False if it already has, and the callback is not kept."""
        if callback is not None and self._cycle.disconnected:
            return False
        self._protocol.on_lost = callback
        return True

    def write(self, chunk: bytes) -> bool:
        """Send one body piece; False when the client reads slower than we write (pause)."""
        if self._cycle.disconnected:
            return True  # the request is ending (on_client_lost); drop the bytes
        self._write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        return not self._flow.write_paused

    async def drain(self) -> None:
        """Wait until the client has read enough to take more."""
        await self._flow.drain()


def direct_writer(scope) -> DirectWriter | None:
    """The direct writer of a request whose chunked response has started, else None
    (another server, HTTP/1.0, a HEAD, a response with a Content-Length)."""
    cycle, protocol = scope.get("extensions", {}).get(DIRECT_WRITE, (None, None))
    if (
        cycle is None
        or not cycle.response_started
        or cycle.response_complete
        or not cycle.chunked_encoding
    ):
        return None
    return DirectWriter(cycle, protocol)


class ConnectionGuard:
    """The limits shared by every connection of one server, and the sweep enforcing them."""

    def __init__(
        self,
        max_connections: int,
        max_header_bytes: int,
        header_timeout_s: float,
        body_timeout_s: float = 0.0,
    ):
        self.max_connections = max_connections
        self.max_header_bytes = max_header_bytes
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s  # 0: no deadline
        # When the cap is reached, this many idle connections are evicted at once, so that
        # a flood costs one scan per batch rather than one per connection.
        self.evict_batch = max(1, max_connections // 32)
        self.connections: set[GuardedHttpToolsProtocol] = set()  # those counted against the cap
        self.counts = {"timed_out": 0, "slow_body": 0, "evicted": 0, "refused": 0, "too_large": 0}
        self._reported = dict(self.counts)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._next_report = 0.0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is None:
            self._loop = loop
            self._next_report = loop.time() + _REPORT_EVERY_S
            self._timer = loop.call_later(self.interval, self._sweep)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._loop = None

    @property
    def interval(self) -> float:
        return min(1.0, max(0.05, self.header_timeout_s / 8))

    def admit(self, proto: GuardedHttpToolsProtocol) -> bool:
        """Count a new connection, evicting slow ones at the cap; False: refuse it."""
        if len(self.connections) >= self.max_connections:
            now = proto.loop.time()
            # Longest waiting first; among those first seen waiting together, the oldest.
            waits = [(p.client_wait(now), p.opened, id(p), p) for p in self.connections]
            slowest = sorted(w for w in waits if w[0] is not None)[: self.evict_batch]
            if not slowest:
                self.counts["refused"] += 1
                return False
            self.counts["evicted"] += len(slowest)
            for *_, p in slowest:
                p.drop()
        self.connections.add(proto)
        return True

    def _sweep(self) -> None:
        loop = self._loop
        if loop is None:
            return
        now = loop.time()
        head_expired = now - self.header_timeout_s
        body_expired = now - self.body_timeout_s if self.body_timeout_s > 0 else -1.0
        for proto in list(self.connections):
            wait = proto.client_wait(now)
            if wait is None:
                continue
            since, for_body = wait
            if not for_body and since <= head_expired:
                self.counts["timed_out"] += 1
                proto.drop()
            elif for_body and since <= body_expired:
                self.counts["slow_body"] += 1
                proto.drop()
        if now >= self._next_report:
            self._report(now)
        self._timer = loop.call_later(self.interval, self._sweep)

    def _report(self, now: float) -> None:
        self._next_report = now + _REPORT_EVERY_S
        new = {k: v - self._reported[k] for k, v in self.counts.items()}
        self._reported = dict(self.counts)
        if any(new.values()):
            log.warning(
                "connection limits, last %ds: %d closed after %gs without a request head "
                "(idle, slowloris or stalled reader), %d after %gs without the whole body, "
                "%d slow clients evicted at the %d-connection cap, %d refused (503), "
                "%d request heads over %d bytes (431)",
                _REPORT_EVERY_S,
                new["timed_out"],
                self.header_timeout_s,
                new["slow_body"],
                self.body_timeout_s,
                new["evicted"],
                self.max_connections,
                new["refused"],
                new["too_large"],
                self.max_header_bytes,
            )


_base = HttpToolsProtocol


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol under the limits of `guard` (see `protocol_class`)."""

    guard: ConnectionGuard

    # A request head is being read while `cycle` is `_head_after`, the cycle whose message
    # completed last (None before the first); `_head_left` is what that head may still use.
    _head_after: object = None
    _head_left = 0
    # For the sweep: the cycle seen idle last and since when; the same for a body awaited.
    _idle_cycle: object = _UNSET
    _idle_unsent = 0
    _idle_since = 0.0
    _body_cycle: object = None
    _body_since = 0.0
    opened = 0.0
    # Called once when the connection is lost (DirectWriter.on_client_lost): a relayed
    # stream ends at once, with no task per stream waiting for the disconnect.
    on_lost = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        _base.connection_made(self, transport)
        guard = self.guard
        guard.start(self.loop)
        self._idle_cycle = None
        self._idle_since = self.opened = self.loop.time()
        if not guard.admit(self):  # `_head_left` stays 0: nothing reaches the parser
            transport.write(_503)
            transport.close()
            return
        self._head_left = guard.max_header_bytes

    def connection_lost(self, exc: Exception | None) -> None:
        _base.connection_lost(self, exc)
        self.guard.connections.discard(self)
        hook, self.on_lost = self.on_lost, None
        if hook is not None:
            hook()

    def client_wait(self, now: float) -> tuple[float, bool] | None:
        """(since when, for a body) this connection has waited on its client, first seen at
        `now` at the latest; None while the gateway has the request (app, queue, upstream).

        Waiting for a request head: just opened, idle after a response, or part of a head
        sent; or reading the end of a response at its own pace: each time it takes some of
        the output still buffered here, the wait starts afresh. Waiting for a body: the
        head is in, the app awaits the rest of the body.
        """
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            unsent = self.transport.get_write_buffer_size()
            if cycle is not self._idle_cycle or unsent != self._idle_unsent:
                self._idle_cycle = cycle  # a new request, or output read, since the last look
                self._idle_unsent = unsent
                self._idle_since = now
            return self._idle_since, False
        if cycle is self._head_after or cycle.response_started:
            return None
        if cycle is not self._body_cycle:
            self._body_cycle = cycle
            self._body_since = now
        return self._body_since, True

    def handle_websocket_upgrade(self) -> None:
        # The connection now belongs to the WebSocket protocol (the gateway has no
        # WebSocket routes: it is closed at once); it leaves the guard.
        self.guard.connections.discard(self)
        _base.handle_websocket_upgrade(self)

    def drop(self) -> None:
        """Close at once, unflushed output and all: the peer is idle or too slow."""
        self.guard.connections.discard(self)
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.cycle is self._head_after:
            left = self._head_left
            if len(data) > left:
                self._head_overflow(data, left)
                return
            self._head_left = left - len(data)
        _base.data_received(self, data)

    def _head_overflow(self, data: bytes, left: int) -> None:
        # Feed only what the limit allows. If that completes the head, go on with the
        # rest: a body, or further pipelined requests, each head with its own budget.
        if self.transport.is_closing():
            return
        cycle = self.cycle
        view = memoryview(data)
        self._head_left = 0
        _base.data_received(self, view[:left])
        if self.transport.is_closing():
            return
        if self.cycle is not cycle:
            self.data_received(view[left:])
            return
        self.guard.counts["too_large"] += 1
        self.guard.connections.discard(self)
        if cycle is None or cycle.response_complete:
            self.transport.write(_431)
            self.transport.close()
        else:  # a response is still being written on this connection: cut it short
            self.transport.abort()

    def on_headers_complete(self) -> None:
        _base.on_headers_complete(self)
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:  # a new request (not an upgrade)
            self.scope.setdefault("extensions", {})[DIRECT_WRITE] = (cycle, self)

    def on_message_complete(self) -> None:
        self._head_after = self.cycle
        self._head_left = self.guard.max_header_bytes
        _base.on_message_complete(self)


def protocol_class(guard: ConnectionGuard) -> type[GuardedHttpToolsProtocol]:
    """A protocol class bound to `guard`, for uvicorn.Config(http=...)."""
    return type("GatewayHttpProtocol", (GuardedHttpToolsProtocol,), {"guard": guard})
