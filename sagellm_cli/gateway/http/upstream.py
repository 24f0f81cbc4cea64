"""The upstream client's interface, and the one implementation the gateway uses.

The client is native.NativeUpstream (keep-alive HTTP/1.1 on asyncio + httptools),
chosen by measurement against aiohttp, aiosonic and pyreqwest: docs/gateway.md, "The
upstream client", and docs/benchmarks.md. Errors that happen before any response byte
arrived are raised as `UpstreamConnectError`, which the proxy may retry elsewhere.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol


class UpstreamConnectError(Exception):
    """The engine could not be reached, or closed before sending a response."""


class UpstreamResponse(Protocol):
    """A response whose body has not been read yet."""

    status: int
    content_type: str

    async def read(self) -> bytes: ...

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def relay(self, write: Callable[[bytes], bool], drain: Callable[[], Awaitable]) -> None:
        """Call `write(piece)` for each body piece as it arrives (no task switch per piece);
        when it returns False, stop reading until `await drain()` returns."""
        ...

    def abort(self, exc: Exception) -> None:
        """Make a running `relay` raise `exc` now (called from a protocol callback)."""
        ...

    async def close(self) -> None: ...


class Upstream(Protocol):
    """A pooled client to every engine."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> UpstreamResponse: ...

    async def get_status(self, url: str, timeout: float) -> int: ...

    async def post_status(self, url: str, body: bytes, timeout: float) -> int:
        """POST a JSON body (or none) and return the status, body discarded (control calls)."""
        ...
