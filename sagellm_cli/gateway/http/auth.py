"""Who may talk to the gateway: bearer tokens, and Host/Origin checks for browsers.

- The inference API takes `--api-key` (open when none is set).
- The management API always takes the admin token, never the API key.
- Every request's `Host` must name this machine (loopback, the bind address, or an
  `--allowed-host`), which defeats DNS rebinding; a present `Origin` must be the
  gateway's own (or an `--allowed-origin`), which defeats cross-site requests.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable

from sagellm_cli.core.protocol import AUTHORIZATION, bearer

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
# Bounds the memo of Host values seen (a client could send endless distinct ones).
_MEMO_SIZE = 256
_AUTHORIZATION = AUTHORIZATION.encode()


class TokenCheck:
    """Constant-time comparison of `Authorization: Bearer <token>`; no token means open."""

    __slots__ = ("_expected",)

    def __init__(self, token: str | None):
        self._expected = bearer(token)[AUTHORIZATION].encode() if token else None

    @property
    def enabled(self) -> bool:
        """True if a token is required."""
        return self._expected is not None

    def allows_raw(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """Check raw ASGI headers (the hot path: no dict is built)."""
        if self._expected is None:
            return True
        for name, value in headers:
            if name == _AUTHORIZATION:
                return hmac.compare_digest(value, self._expected)
        return False

    def allows(self, authorization: str | None) -> bool:
        """Check a decoded header value."""
        if self._expected is None:
            return True
        return authorization is not None and hmac.compare_digest(
            authorization.encode(), self._expected
        )


def is_loopback(host: str) -> bool:
    """True for localhost names and loopback addresses (`[::1]` too)."""
    host = host.strip().lower().rstrip(".")
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def split_host_port(value: str) -> str:
    """The host part of a `Host` header or URL authority (`[::1]:80` -> `::1`)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rpartition(":")[0] if value.count(":") == 1 else value


class RequestGuard:
    """Host and Origin checks on every request, from raw ASGI headers.

    `check` returns None when the request may proceed, else `(status, message)`.
    Results per distinct Host/Origin value are memoised, so the hot path pays one
    header scan and a dict lookup.
    """

    def __init__(
        self,
        bind_host: str,
        allowed_hosts: Iterable[str] = (),
        allowed_origins: Iterable[str] = (),
    ):
        hosts = {h.strip().lower() for h in allowed_hosts if h.strip()}
        self.any_host = "*" in hosts
        bind = bind_host.strip("[]").lower()
        if bind not in ("", "0.0.0.0", "::"):
            hosts.add(bind)
        self.hosts = frozenset(hosts)
        self.origins = frozenset(o.strip().rstrip("/").lower() for o in allowed_origins)
        self._host_memo: dict[bytes, bool] = {}

    def host_ok(self, value: bytes) -> bool:
        """True if a `Host` header names this gateway."""
        known = self._host_memo.get(value)
        if known is not None:
            return known
        name = split_host_port(value.decode("latin-1"))
        ok = self.any_host or name in self.hosts or is_loopback(name)
        if len(self._host_memo) < _MEMO_SIZE:
            self._host_memo[value] = ok
        return ok

    def origin_ok(self, origin: bytes, host: bytes | None) -> bool:
        """True if `Origin` is this gateway itself (same host and port) or allowed."""
        text = origin.decode("latin-1").strip().rstrip("/").lower()
        if text in self.origins or "*" in self.origins:
            return True
        scheme, sep, authority = text.partition("://")
        if not sep or scheme not in ("http", "https") or host is None:
            return False  # includes `Origin: null` (sandboxed frames, file://)
        return authority == host.decode("latin-1").strip().lower()

    def check(self, headers: list[tuple[bytes, bytes]]) -> tuple[int, str] | None:
        """None if the request may proceed, else the HTTP status and message."""
        host = origin = None
        for name, value in headers:
            if name == b"host":
                host = value
            elif name == b"origin":
                origin = value
        if host is not None and not self.host_ok(host):
            return (
                403,
                f"Host {host.decode('latin-1')!r} is not allowed "
                "(start the gateway with --allowed-host NAME to accept it)",
            )
        if origin is not None and not self.origin_ok(origin, host):
            return (
                403,
                f"Origin {origin.decode('latin-1')!r} is not allowed: cross-site requests are "
                "refused (start the gateway with --allowed-origin ORIGIN to accept it)",
            )
        return None
