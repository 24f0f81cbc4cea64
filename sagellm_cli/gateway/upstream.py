"""Upstream HTTP clients behind one small interface: aiohttp (default), httpx, native.

aiohttp was measured much faster than httpx; the experimental native client
(native.py) is cheaper still but opt-in (see docs/benchmarks.md). Errors that happen
before any response byte arrived are raised as `UpstreamConnectError`, which the proxy
may retry elsewhere.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol


class UpstreamConnectError(Exception):
    """The engine could not be reached, or closed before sending a response."""


class UpstreamResponse(Protocol):
    """A response whose body has not been read yet."""

    status: int
    content_type: str

    async def read(self) -> bytes: ...

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def close(self) -> None: ...


class Upstream(Protocol):
    """A pooled client to every engine."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> UpstreamResponse: ...

    async def get_status(self, url: str, timeout: float) -> int: ...


class _AiohttpResponse:
    __slots__ = ("_resp", "status", "content_type")

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


class AiohttpUpstream:
    """aiohttp ClientSession with an unbounded keep-alive pool."""

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

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> UpstreamResponse:
        try:
            resp = await self.session.post(url, data=body, headers=headers)
        except self._errors as exc:
            raise UpstreamConnectError(f"{type(exc).__name__}: {exc}") from exc
        return _AiohttpResponse(resp)

    async def get_status(self, url: str, timeout: float) -> int:
        async with self.session.get(
            url, timeout=self._aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            await resp.read()
            return resp.status


class _HttpxResponse:
    __slots__ = ("_resp", "status", "content_type")

    def __init__(self, resp):
        self._resp = resp
        self.status = resp.status_code
        self.content_type = resp.headers.get("content-type", "application/json")

    async def read(self) -> bytes:
        try:
            return await self._resp.aread()
        finally:
            await self._resp.aclose()

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self._resp.aiter_raw():
            yield chunk

    async def close(self) -> None:
        await self._resp.aclose()


class HttpxUpstream:
    """httpx AsyncClient; kept for comparison (it was slower under load here)."""

    def __init__(self, connect_timeout: float = 3.0):
        self.connect_timeout = connect_timeout
        self.client = None

    async def start(self) -> None:
        import httpx

        self._httpx = httpx
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=self.connect_timeout),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=1024),
        )

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> UpstreamResponse:
        httpx = self._httpx
        request = self.client.build_request("POST", url, content=body, headers=headers)
        try:
            resp = await self.client.send(request, stream=True)
        except (httpx.TransportError, OSError) as exc:
            raise UpstreamConnectError(f"{type(exc).__name__}: {exc}") from exc
        return _HttpxResponse(resp)

    async def get_status(self, url: str, timeout: float) -> int:
        resp = await self.client.get(url, timeout=timeout)
        return resp.status_code


def make_upstream(kind: str, connect_timeout: float) -> Upstream:
    """The configured upstream client (not started)."""
    if kind == "httpx":
        return HttpxUpstream(connect_timeout)
    if kind == "native":
        from sagellm_cli.gateway.native import NativeUpstream

        return NativeUpstream(connect_timeout)
    return AiohttpUpstream(connect_timeout)
