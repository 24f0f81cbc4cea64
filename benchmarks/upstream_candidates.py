"""Upstream clients measured against the gateway's own (benchmarks/gateway_overhead.py).

Each class has the interface of `sagellm_cli.gateway.http.upstream.Upstream` and keeps the
proxy's contract: an error before the response headers is an `UpstreamConnectError`,
`close()` of an unfinished response drops the connection (the engine aborts). They live
here, not in the gateway, because they lost the comparison; they are kept so that the
comparison can be re-run (`gateway_overhead.py --candidates`). Each needs its library:
`pip install aiosonic pyreqwest`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from sagellm_cli.gateway.http.upstream import UpstreamConnectError


class _RelayByChunks:
    """`relay` and `abort` of the Upstream interface on top of `chunks()`: a task switch
    per piece, which is what these clients cost anyway (the gateway's own client relays
    from its protocol callback)."""

    __slots__ = ()

    async def relay(self, write, drain) -> None:
        async for chunk in self.chunks():
            if not write(chunk):
                await drain()
            aborted = getattr(self, "_aborted", None)
            if aborted is not None:
                raise aborted

    def abort(self, exc: Exception) -> None:
        self._aborted = exc


# -- aiohttp on its fast paths -----------------------------------------------------------


class _AiohttpResponse(_RelayByChunks):
    __slots__ = ("_aborted", "_resp", "status", "content_type")

    def __init__(self, resp):
        self._resp = resp
        self.status = resp.status
        self.content_type = resp.headers.get("Content-Type", "application/json")

    async def read(self) -> bytes:
        return await self._resp.read()

    async def chunks(self) -> AsyncIterator[bytes]:
        # Whatever is buffered goes out as one piece (what iter_any() does, one layer less).
        readany = self._resp.content.readany
        while chunk := await readany():
            yield chunk

    async def close(self) -> None:
        # close(), not release(): an unfinished stream must drop the connection so
        # the engine notices and aborts the generation.
        self._resp.close()


# Sent with every request, so that aiohttp adds none of its own defaults (User-Agent,
# Accept-Encoding: gzip: bodies pass through undecoded, so none may come back compressed).
_BASE_HEADERS = {"User-Agent": "sagellm-gateway", "Accept": "*/*", "Accept-Encoding": "identity"}
_NO_HEADERS: dict[str, str] = {}


class AiohttpUpstream:
    """aiohttp ClientSession on its fast paths, with an unbounded keep-alive pool (the
    best aiohttp could do here; it was the gateway's default until 2026-11).

    Per request it does only what aiohttp must: no cookie jar, no decompression, no
    redirects, no per-call timeout object; URLs and header sets are built once and reused.
    """

    def __init__(self, connect_timeout: float = 3.0):
        self.connect_timeout = connect_timeout
        self.session = None
        self._errors: tuple[type[BaseException], ...] = ()
        self._urls: dict = {}
        self._headers: dict[int, tuple[dict, object]] = {}
        self._timeouts: dict[float, object] = {}

    async def start(self) -> None:
        import aiohttp
        from multidict import CIMultiDict
        from yarl import URL

        self._aiohttp = aiohttp
        self._url_class = URL
        self._multidict = CIMultiDict
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0,
                keepalive_timeout=30,
                use_dns_cache=True,
                ttl_dns_cache=10,
                enable_cleanup_closed=False,
            ),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            read_bufsize=1 << 16,
        )
        self._errors = (
            aiohttp.ClientConnectionError,
            aiohttp.ClientPayloadError,
            TimeoutError,
            OSError,
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def _url(self, url: str):
        parsed = self._urls.get(url)
        if parsed is None:
            parsed = self._url_class(url)
            if len(self._urls) < 4096:
                self._urls[url] = parsed
        return parsed

    def _merged(self, headers: dict[str, str]):
        """The request's headers with _BASE_HEADERS, built once per header dict (the proxy's
        are module constants)."""
        entry = self._headers.get(id(headers))
        if entry is None or entry[0] is not headers:
            entry = (headers, self._multidict({**_BASE_HEADERS, **headers}))
            if len(self._headers) < 64:
                self._headers[id(headers)] = entry
        return entry[1]

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> _AiohttpResponse:
        try:
            resp = await self.session.post(
                self._url(url), data=body, headers=self._merged(headers), allow_redirects=False
            )
        except self._errors as exc:
            raise UpstreamConnectError(f"{type(exc).__name__}: {exc}") from exc
        return _AiohttpResponse(resp)

    def _timeout(self, seconds: float):
        timeout = self._timeouts.get(seconds)
        if timeout is None:
            timeout = self._timeouts[seconds] = self._aiohttp.ClientTimeout(total=seconds)
        return timeout

    async def get_status(self, url: str, timeout: float) -> int:
        async with self.session.get(
            self._url(url),
            headers=self._merged(_NO_HEADERS),
            timeout=self._timeout(timeout),
            allow_redirects=False,
        ) as resp:
            await resp.read()
            return resp.status


# -- aiohttp as the gateway used it before ------------------------------------------


class _AiohttpPlainResponse(_RelayByChunks):
    __slots__ = ("_aborted", "_resp", "status", "content_type")

    def __init__(self, resp):
        self._resp = resp
        self.status = resp.status
        self.content_type = resp.headers.get("Content-Type", "application/json")

    async def read(self) -> bytes:
        return await self._resp.read()

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self._resp.content.iter_any():
            yield chunk

    async def close(self) -> None:
        # close(), not release(): an unfinished stream must drop the connection so
        # the engine notices and aborts the generation.
        self._resp.close()


class AiohttpPlainUpstream:
    """The gateway's aiohttp client as it was, without the fast paths above."""

    def __init__(self, connect_timeout: float = 3.0):
        self.connect_timeout = connect_timeout
        self.session = None
        self._errors: tuple[type[BaseException], ...] = ()

    async def start(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )
        self._aiohttp = aiohttp
        self._errors = (
            aiohttp.ClientConnectionError,
            aiohttp.ClientPayloadError,
            TimeoutError,
            OSError,
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> _AiohttpPlainResponse:
        try:
            resp = await self.session.post(url, data=body, headers=headers)
        except self._errors as exc:
            raise UpstreamConnectError(f"{type(exc).__name__}: {exc}") from exc
        return _AiohttpPlainResponse(resp)

    async def get_status(self, url: str, timeout: float) -> int:
        async with self.session.get(
            url, timeout=self._aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            await resp.read()
            return resp.status


# -- aiosonic --------------------------------------------------------------------------


class _AiosonicResponse(_RelayByChunks):
    __slots__ = ("_aborted", "_resp", "status", "content_type")

    def __init__(self, resp):
        self._resp = resp
        self.status = resp.status_code
        self.content_type = resp.headers.get("content-type", "application/json")

    async def read(self) -> bytes:
        return await self._resp.content()

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self._resp.read_chunks():
            yield chunk

    async def close(self) -> None:
        await self._resp.aclose()  # closes the connection unless the body was read


class AiosonicUpstream:
    """aiosonic 1.x HTTPClient: one pool of up to 4096 connections, no request timeout."""

    def __init__(self, connect_timeout: float = 3.0):
        self.connect_timeout = connect_timeout
        self.client = None

    async def start(self) -> None:
        import aiosonic
        from aiosonic.connectors import TCPConnector
        from aiosonic.exceptions import AiosonicError
        from aiosonic.pools import PoolConfig
        from aiosonic.timeout import Timeouts

        timeouts = Timeouts(sock_connect=self.connect_timeout, sock_read=None, request_timeout=None)
        pool = PoolConfig(size=4096, max_conn_requests=None, max_conn_idle_ms=30000)
        self.client = aiosonic.HTTPClient(
            connector=TCPConnector(pool_configs={":default": pool}, timeouts=timeouts),
            handle_cookies=False,
        )
        self._errors = (AiosonicError, OSError, TimeoutError)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> _AiosonicResponse:
        try:
            resp = await self.client.request(url, "POST", headers=headers, data=body, stream=True)
        except self._errors as exc:
            raise UpstreamConnectError(f"{type(exc).__name__}: {exc}") from exc
        return _AiosonicResponse(resp)

    async def get_status(self, url: str, timeout: float) -> int:
        import asyncio

        resp = await asyncio.wait_for(self.client.get(url), timeout)
        return resp.status_code


# -- pyreqwest (reqwest/hyper on a Tokio runtime) ----------------------------------------


class _PyreqwestResponse(_RelayByChunks):
    __slots__ = ("_aborted", "_req", "_resp", "_reader", "status", "content_type")

    def __init__(self, req, resp):
        self._req = req
        self._resp = resp
        self._reader = resp.body_reader  # a property
        self.status = resp.status
        self.content_type = resp.get_header("content-type") or "application/json"

    async def read(self) -> bytes:
        return (await self._reader.bytes()).to_bytes()

    async def chunks(self) -> AsyncIterator[bytes]:
        read_chunk = self._reader.read_chunk
        while (chunk := await read_chunk()) is not None:
            yield chunk.to_bytes()

    async def close(self) -> None:
        req, self._req = self._req, None
        if req is not None:
            await req.__aexit__(None, None, None)  # drops an unfinished body's connection


class PyreqwestUpstream:
    """pyreqwest 0.15 Client: hyper's pool, no redirects, no decompression."""

    def __init__(self, connect_timeout: float = 3.0):
        self.connect_timeout = connect_timeout
        self.client = None

    async def start(self) -> None:
        from datetime import timedelta

        from pyreqwest.client import ClientBuilder
        from pyreqwest.exceptions import TransportError

        self.client = (
            ClientBuilder()
            .connect_timeout(timedelta(seconds=self.connect_timeout))
            .pool_idle_timeout(timedelta(seconds=30))
            .follow_redirects(False)
            .referer(False)
            .gzip(False)
            .brotli(False)
            .zstd(False)
            .deflate(False)
            .user_agent("sagellm-gateway")
            .build()
        )
        self._errors = (TransportError, OSError)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> _PyreqwestResponse:
        req = self.client.post(url).headers(headers).body_bytes(body).build_streamed()
        try:
            resp = await req.__aenter__()
        except self._errors as exc:
            raise UpstreamConnectError(f"{type(exc).__name__}: {exc}") from exc
        return _PyreqwestResponse(req, resp)

    async def get_status(self, url: str, timeout: float) -> int:
        from datetime import timedelta

        resp = await self.client.get(url).timeout(timedelta(seconds=timeout)).build().send()
        return resp.status


CANDIDATES = {
    "aiohttp": AiohttpUpstream,
    "aiohttp-plain": AiohttpPlainUpstream,
    "aiosonic": AiosonicUpstream,
    "pyreqwest": PyreqwestUpstream,
}
