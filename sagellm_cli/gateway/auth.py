"""Bearer-token checks for the inference API (`--api-key`) and the management API."""

from __future__ import annotations

import hmac


class TokenCheck:
    """Constant-time comparison of `Authorization: Bearer <token>`; no token means open."""

    __slots__ = ("_expected",)

    def __init__(self, token: str | None):
        self._expected = f"Bearer {token}".encode() if token else None

    @property
    def enabled(self) -> bool:
        """True if a token is required."""
        return self._expected is not None

    def allows_raw(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """Check raw ASGI headers (the hot path: no dict is built)."""
        if self._expected is None:
            return True
        for name, value in headers:
            if name == b"authorization":
                return hmac.compare_digest(value, self._expected)
        return False

    def allows(self, authorization: str | None) -> bool:
        """Check a decoded header value."""
        if self._expected is None:
            return True
        return authorization is not None and hmac.compare_digest(
            authorization.encode(), self._expected
        )


def management_check(api_key: str | None, admin_token: str | None) -> TokenCheck:
    """The admin token guards management; without one, the API key does; else it is open.

    An open management API is only possible on loopback: `GatewayConfig.validate`
    refuses any other bind address without an admin token.
    """
    return TokenCheck(admin_token or api_key)
