"""A minimal keep-alive HTTP/1.1 client on asyncio.Protocol + httptools, for the hot path.

The gateway only POSTs small JSON bodies to engines on a trusted network and
passes the answers through, so it needs a fraction of what aiohttp's client
does per request (header multidicts, payload registry, tracing hooks, cookie
jar, ...). Profiling under load showed that machinery as the largest single
cost of a proxied request; this client writes one pre-formatted request and
parses the answer with httptools (uvicorn's parser). Only `http://` URLs.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

from sagellm_cli.gateway.upstream import UpstreamConnectError

_HIGH_WATER = 1 << 16  # pause reading from the engine while this much is unread


class _Connection(asyncio.Protocol):
    """One keep-alive connection; serves one request at a time."""

    def __init__(self, pool: list[_Connection]):
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._parser = httptools.HttpResponseParser(self)
        self._chunks: collections.deque[bytes] = collections.deque()
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.content_type = "application/json"
        self.complete = False
        self.keep_alive = False
        self.error: Exception | None = None
        self.got_bytes = False
        self._until_eof = True  # neither Content-Length nor chunked: the body ends at close
        self._paused = False
        self._buffered = 0
        self._chunks.clear()
        self._headers_waiter: asyncio.Future | None = None
        self._data_waiter: asyncio.Future | None = None

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamConnectError(f"bad HTTP response: {exc}"))
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self in self._pool:
            self._pool.remove(self)
        if self.complete or self.error is not None:
            return
        if self.status and self._until_eof:
            self.on_message_complete()
            return
        self._fail(
            UpstreamConnectError(
                "connection closed before the response ended"
                if self.got_bytes
                else "server closed the connection without answering"
            )
        )

    # -- httptools callbacks ---------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower == b"content-type":
            self.content_type = value.decode("latin-1")
        elif lower == b"content-length" or (
            lower == b"transfer-encoding" and b"chunked" in value.lower()
        ):
            self._until_eof = False

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        # Read now: after the message completes the parser has already reset.
        self.keep_alive = self._parser.should_keep_alive()
        _wake(self._headers_waiter)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        _wake(self._data_waiter)

    def on_message_complete(self) -> None:
        self.complete = True
        _wake(self._headers_waiter)
        _wake(self._data_waiter)

    # -- request/response ------------------------------------------------------

    def _fail(self, exc: Exception) -> None:
        self.error = exc
        _wake(self._headers_waiter)
        _wake(self._data_waiter)

    async def request(self, head: bytes, body: bytes) -> None:
        """Send one request and wait for the response headers."""
        self._reset()
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

    def release(self) -> None:
        """Back to the pool if the exchange finished cleanly, else drop the connection."""
        if self.complete and self.keep_alive and not self.closed and not self._chunks:
            self._pool.append(self)
        elif not self.closed:
            self.closed = True
            self.transport.close()


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

    async def close(self) -> None:
        # An unfinished response closes the connection, so the engine aborts the generation.
        self._conn.release()


async def _exchange(conn: _Connection, head: bytes, body: bytes) -> _NativeResponse:
    try:
        await conn.request(head, body)
    except BaseException:
        conn.release()  # closes it: the exchange did not finish
        raise
    return _NativeResponse(conn)


class NativeUpstream:
    """Keep-alive connection pools per engine, no limit on connections."""

    def __init__(self, connect_timeout: float = 3.0):
        self.connect_timeout = connect_timeout
        self._pools: dict[tuple[str, int], list[_Connection]] = {}
        self._targets: dict[str, tuple[tuple[str, int], bytes, bytes]] = {}

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        for pool in self._pools.values():
            for conn in list(pool):
                conn.transport.close()
            pool.clear()

    def _target(self, url: str) -> tuple[tuple[str, int], bytes, bytes]:
        """(host, port), request target and Host header of a URL, cached per URL."""
        target = self._targets.get(url)
        if target is None:
            parts = urlsplit(url)
            if parts.scheme != "http" or not parts.hostname:
                raise UpstreamConnectError(f"unsupported URL {url!r} (only http://)")
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            target = (parts.hostname, parts.port or 80), path.encode(), parts.netloc.encode()
            if len(self._targets) < 4096:
                self._targets[url] = target
        return target

    def _pool(self, key: tuple[str, int]) -> list[_Connection]:
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = []
        return pool

    async def _connect(self, key: tuple[str, int]) -> _Connection:
        pool = self._pool(key)
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(pool), *key), self.connect_timeout
            )
        except (OSError, asyncio.TimeoutError) as exc:
            raise UpstreamConnectError(f"{type(exc).__name__}: {exc}") from exc
        return conn

    def _idle(self, key: tuple[str, int]) -> _Connection | None:
        pool = self._pool(key)
        while pool:
            conn = pool.pop()
            if not conn.closed and not conn.transport.is_closing():
                return conn
        return None

    async def _send(self, method: bytes, url: str, body: bytes, headers: dict[str, str]):
        key, path, host = self._target(url)
        head = b"".join(
            (
                method, b" ", path, b" HTTP/1.1\r\nHost: ", host,
                b"\r\nContent-Length: ", str(len(body)).encode(), b"\r\n",
                *(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers.items()),
                b"\r\n",
            )
        )  # fmt: skip
        conn = self._idle(key)
        if conn is not None:
            try:
                return await _exchange(conn, head, body)
            except UpstreamConnectError:
                if conn.got_bytes:
                    raise
                # The engine closed this idle keep-alive connection just as it was reused
                # (its keep-alive timeout): that is no failure of the engine; use a new one.
        return await _exchange(await self._connect(key), head, body)

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> _NativeResponse:
        return await self._send(b"POST", url, body, headers)

    async def get_status(self, url: str, timeout: float) -> int:
        return await asyncio.wait_for(self._get_status(url), timeout)

    async def _get_status(self, url: str) -> int:
        resp = await self._send(b"GET", url, b"", {})
        try:
            await resp.read()
        finally:
            await resp.close()
        return resp.status
