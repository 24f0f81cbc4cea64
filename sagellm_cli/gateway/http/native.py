"""The gateway's upstream client: keep-alive HTTP/1.1 on asyncio.Protocol + httptools.

The gateway only sends small JSON POSTs (and /health GETs) to engines it started, on
plain http://, and passes the answers through, so it needs a fraction of what a general
client does per request (header multidicts, payload registry, tracing hooks, cookie
jar, redirects, TLS, proxies...). It writes one pre-formatted request and parses the
answer with httptools (llhttp, the parser uvicorn uses). Why this and not a library:
docs/gateway.md, "The upstream client"; the numbers: docs/benchmarks.md.

What it guarantees, beyond parsing HTTP/1.1:
- `http://` only: any other scheme is refused with an explicit error, never attempted.
- A request is written once. A connection that fails before any response byte is an
  `UpstreamConnectError` (the proxy may try another engine); the client itself never
  re-sends, because the engine may have read the request already.
- Idle keep-alive connections are reused newest first and closed after `idle_timeout`
  (default 4 s, under uvicorn's and so vLLM's 5 s keep-alive), so the engine rarely
  closes one just as it is reused, and pools shrink back after a burst.
- An unfinished response closes its connection (the engine aborts the generation);
  reading pauses while more than 64 KiB is unread (the client is slower).
- Informational (1xx) responses are skipped; bytes arriving on an idle connection
  close it (it is out of sync).
- Bodies pass through undecoded, so every request says `Accept-Encoding: identity`.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

from sagellm_cli.gateway.http.upstream import UpstreamConnectError

_HIGH_WATER = 1 << 16  # pause reading from the engine while this much is unread
IDLE_TIMEOUT_S = 4.0
_REAP_EVERY_S = 1.0


class UnsupportedURL(UpstreamConnectError):
    """An engine URL that this client will not connect to (only http:// is supported)."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; serves one request at a time."""

    def __init__(self, pool: collections.deque[_Connection]):
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.busy = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._chunks: collections.deque[bytes] = collections.deque()
        self._sink = None  # relay(): body bytes go here from on_body, not to _chunks
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.content_type = "application/json"
        self.complete = False
        self.keep_alive = False
        self.error: Exception | None = None
        self.got_bytes = False
        self._until_eof = True  # neither Content-Length nor chunked: the body ends at close
        self._informational = False
        self._paused = False
        self._buffered = 0
        self._chunks.clear()
        self._headers_waiter: asyncio.Future | None = None
        self._data_waiter: asyncio.Future | None = None

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.busy:
            self.close()  # nothing was asked: the connection is out of sync
            return
        self.got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamConnectError(f"bad HTTP response: {exc}"))
            self.close()
            return
        if self._sink is not None and self._chunks:
            self._flush()

    def connection_lost(self, exc) -> None:
        self.closed = True
        if not self.busy:
            if self in self._pool:
                self._pool.remove(self)
            return
        if self.complete or self.error is not None:
            return
        if self.status and self._until_eof:
            self.on_message_complete()
            return
        self._fail(
            UpstreamConnectError(
                "connection closed before the response ended"
                if self.got_bytes
                else "the engine closed the connection without answering "
                "(the request may have reached it; it is not re-sent)"
            )
        )

    # -- httptools callbacks ---------------------------------------------------

    def on_message_begin(self) -> None:
        self.content_type = "application/json"
        self._until_eof = True

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower == b"content-type":
            self.content_type = value.decode("latin-1")
        elif lower == b"content-length" or (
            lower == b"transfer-encoding" and b"chunked" in value.lower()
        ):
            self._until_eof = False

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._informational = True  # 100 Continue, 103 Early Hints: the answer follows
            return
        self.status = status
        # Read now: after the message completes the parser has already reset.
        self.keep_alive = self._parser.should_keep_alive()
        _wake(self._headers_waiter)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        if self._sink is not None:
            return  # relay(): data_received flushes once the whole read is parsed
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        _wake(self._data_waiter)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self.complete = True
        _wake(self._headers_waiter)
        _wake(self._data_waiter)

    # -- request/response ------------------------------------------------------

    def _fail(self, exc: Exception) -> None:
        self.error = exc
        _wake(self._headers_waiter)
        _wake(self._data_waiter)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()

    async def request(self, head: bytes, body: bytes) -> None:
        """Send one request and wait for the response headers."""
        self._reset()
        self.busy = True
        if len(body) < 16384:
            self.transport.write(head + body)  # one segment for the usual small request
        else:
            self.transport.writelines((head, body))
        if not self.status and self.error is None:
            self._headers_waiter = asyncio.get_running_loop().create_future()
            await self._headers_waiter
            self._headers_waiter = None
        if not self.status:
            raise self.error or UpstreamConnectError("no response")

    async def next_chunk(self) -> bytes:
        """The next body bytes, or b"" at the end of the body."""
        while not self._chunks:
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            self._data_waiter = asyncio.get_running_loop().create_future()
            await self._data_waiter
            self._data_waiter = None
        # Everything buffered goes out as one piece, like aiohttp's iter_any().
        chunks = self._chunks
        chunk = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._paused:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    def _flush(self) -> None:
        """relay(): what one read brought goes to the sink as one piece (one write)."""
        chunks = self._chunks
        piece = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if not self._sink(piece) and not self._paused:  # the receiver is full: stop reading
            self._paused = True
            self.transport.pause_reading()
            _wake(self._data_waiter)

    async def relay(self, write, drain) -> None:
        """Hand every body piece to `write` as it arrives, until the body ends.

        `write(chunk) -> bool` runs inside the protocol callback (no task switch per
        piece), once per read from the engine (the SSE events it brought, joined, as
        `next_chunk` would return them); False pauses reading from the engine until `await drain()` returns.
        Raises what `next_chunk` raises when the connection fails.
        """
        self._sink = write
        if self._chunks:  # what arrived with the headers
            self._flush()
        loop = asyncio.get_running_loop()
        try:
            while not self.complete:
                if self.error is not None:
                    raise self.error
                if self._paused:
                    await drain()
                    self._paused = False
                    if not self.closed:
                        self.transport.resume_reading()
                    continue
                self._data_waiter = loop.create_future()
                await self._data_waiter
                self._data_waiter = None
        finally:
            self._sink = None
            self._data_waiter = None

    def abort(self, exc: Exception) -> None:
        """End a `relay` in progress: it raises `exc` (the client went away)."""
        if not self.complete and self.error is None:
            self._fail(exc)

    def release(self) -> None:
        """Back to the pool if the exchange finished cleanly, else drop the connection."""
        self.busy = False
        if self.complete and self.keep_alive and not self.closed and not self._chunks:
            self.idle_since = asyncio.get_running_loop().time()
            self._pool.append(self)
        else:
            self.close()


def _wake(waiter: asyncio.Future | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class _NativeResponse:
    __slots__ = ("_conn", "status", "content_type")

    def __init__(self, conn: _Connection):
        self._conn = conn
        self.status = conn.status
        self.content_type = conn.content_type

    async def read(self) -> bytes:
        conn = self._conn
        parts = []
        while chunk := await conn.next_chunk():
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while chunk := await conn.next_chunk():
            yield chunk

    async def relay(self, write, drain) -> None:
        """Pass the body to `write` from the protocol callback: see `_Connection.relay`."""
        await self._conn.relay(write, drain)

    def abort(self, exc: Exception) -> None:
        """Make a running `relay` raise `exc`; the connection is then dropped at `close`."""
        self._conn.abort(exc)

    async def close(self) -> None:
        # An unfinished response closes the connection, so the engine aborts the generation.
        self._conn.release()


class NativeUpstream:
    """Keep-alive connection pools per engine, no limit on connections."""

    def __init__(self, connect_timeout: float = 3.0, idle_timeout: float = IDLE_TIMEOUT_S):
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self._pools: dict[tuple[str, int], collections.deque[_Connection]] = {}
        self._targets: dict[str, tuple[tuple[str, int], bytes, bytes]] = {}
        self._reaper: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        self._schedule_reap()

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for pool in self._pools.values():
            for conn in list(pool):
                conn.close()
            pool.clear()

    def idle_connections(self) -> int:
        """Open connections waiting in the pools (for tests and status)."""
        return sum(len(pool) for pool in self._pools.values())

    # -- idle connections --------------------------------------------------------

    def _schedule_reap(self) -> None:
        loop = asyncio.get_running_loop()
        self._reaper = loop.call_later(min(_REAP_EVERY_S, self.idle_timeout / 2), self._reap)

    def _reap(self) -> None:
        """Close connections idle for longer than idle_timeout (the oldest are on the left)."""
        deadline = asyncio.get_running_loop().time() - self.idle_timeout
        for pool in self._pools.values():
            while pool and pool[0].idle_since < deadline:
                pool.popleft().close()
        self._schedule_reap()

    def _idle(self, key: tuple[str, int]) -> _Connection | None:
        pool = self._pools.get(key)
        while pool:
            conn = pool.pop()  # the newest: the least likely to be closed by the engine
            if not conn.closed and not conn.transport.is_closing():
                return conn
        return None

    # -- requests ------------------------------------------------------------------

    def _target(self, url: str) -> tuple[tuple[str, int], bytes, bytes]:
        """(host, port), request target and Host header of a URL, cached per URL."""
        target = self._targets.get(url)
        if target is None:
            parts = urlsplit(url)
            if parts.scheme != "http" or not parts.hostname:
                raise UnsupportedURL(
                    f"engine URL {url!r} is not supported: the gateway connects to engines "
                    "over plain http:// only (no TLS)"
                )
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            target = (parts.hostname, parts.port or 80), path.encode(), parts.netloc.encode()
            if len(self._targets) < 4096:
                self._targets[url] = target
        return target

    async def _connect(self, key: tuple[str, int]) -> _Connection:
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = collections.deque()
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(pool), *key), self.connect_timeout
            )
        except (OSError, asyncio.TimeoutError) as exc:
            raise UpstreamConnectError(f"{type(exc).__name__}: {exc}") from exc
        return conn

    async def _send(
        self, method: bytes, url: str, body: bytes, headers: dict[str, str]
    ) -> _NativeResponse:
        key, path, host = self._target(url)
        head = b"".join(
            (
                method, b" ", path, b" HTTP/1.1\r\nHost: ", host,
                b"\r\nAccept-Encoding: identity\r\nContent-Length: ", str(len(body)).encode(),
                b"\r\n",
                *(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers.items()),
                b"\r\n",
            )
        )  # fmt: skip
        lines = len(headers) + 5  # request line, 3 of ours, the caller's, the blank line
        if head.count(b"\n") != lines or head.count(b"\r") != lines:
            raise ValueError("a header name or value contains a line break")
        conn = self._idle(key) or await self._connect(key)
        try:
            await conn.request(head, body)
        except BaseException:
            conn.release()  # closes it: the exchange did not finish
            raise
        return _NativeResponse(conn)

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> _NativeResponse:
        return await self._send(b"POST", url, body, headers)

    async def get_status(self, url: str, timeout: float) -> int:
        return await asyncio.wait_for(self._get_status(url), timeout)

    async def post_status(self, url: str, body: bytes, timeout: float) -> int:
        return await asyncio.wait_for(self._status(b"POST", url, body), timeout)

    async def _get_status(self, url: str) -> int:
        return await self._status(b"GET", url, b"")

    async def _status(self, method: bytes, url: str, body: bytes) -> int:
        headers = {"Content-Type": "application/json"} if body else {}
        resp = await self._send(method, url, body, headers)
        try:
            await resp.read()
        finally:
            await resp.close()
        return resp.status
