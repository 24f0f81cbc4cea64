"""Port checks and allocation. Allocation happens under the state lock."""

from __future__ import annotations

import socket
from collections.abc import Iterable

from sagellm_cli.core.errors import BadInput, ResourceUnavailable


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host:port` with SO_REUSEADDR, not yet listening.

    Raises OSError (EADDRINUSE, EADDRNOTAVAIL) like `socket.bind`.
    """
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("" if host in ("0.0.0.0", "::") else host, port))
    except BaseException:  # also TypeError/ValueError for a bad host: never leak the fd
        sock.close()
        raise
    return sock


def check_host(host: str) -> None:
    """Fail with exit 2 unless `host` is an address this machine can bind.

    Accepts IPv4 and IPv6 literals (without brackets), `localhost` and names that resolve
    to a local address; the test is a bind to port 0, the same call engines make later.
    """
    if not isinstance(host, str) or not host.strip():
        raise BadInput("the host is empty", hint="use e.g. 127.0.0.1, ::1 or 0.0.0.0")
    shown = repr(host) if len(host) <= 60 else repr(host[:57] + "...")
    if host.startswith("[") and host.endswith("]"):
        raise BadInput(
            f"host {shown} has brackets", hint=f"write the IPv6 address without them: {host[1:-1]}"
        )
    try:
        bind_socket(host, 0).close()
    except socket.gaierror:
        raise BadInput(
            f"host {shown} does not resolve",
            hint="use an IP address, localhost or a resolvable name",
        ) from None
    except (OSError, UnicodeError, ValueError, TypeError) as exc:  # not local; IDNA; NUL
        why = getattr(exc, "strerror", None) or str(exc)
        raise BadInput(
            f"cannot bind to host {shown}: {why}",
            hint="use an address of this machine, e.g. 127.0.0.1 or 0.0.0.0",
        ) from None


def is_port_free(host: str, port: int) -> bool:
    """True if nothing listens on `host:port` (checked by binding it)."""
    try:
        bind_socket(host, port).close()
    except OSError:
        return False
    return True


def check_requested_port(host: str, port: int, taken: Iterable[int]) -> None:
    """Fail with exit 4 if a port the user asked for is recorded or bound."""
    if not 1 <= port <= 65535:
        raise BadInput(f"port {port} is out of range", hint="use a port between 1 and 65535")
    if port in set(taken):
        raise ResourceUnavailable(
            f"port {port} is already used by another sagellm engine",
            hint="pick another --port or leave it out to get a free one",
        )
    if not is_port_free(host, port):
        raise ResourceUnavailable(
            f"port {port} on {host} is already in use",
            hint="pick another --port or leave it out to get a free one",
        )


def allocate_port(host: str, taken: Iterable[int], attempts: int = 50) -> int:
    """A port the OS reports free and no engine record holds."""
    taken = set(taken)
    bind_host = "" if host in ("0.0.0.0", "::") else host
    for _ in range(attempts):
        with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
            sock.bind((bind_host, 0))
            port = sock.getsockname()[1]
        if port not in taken:
            return port
    raise ResourceUnavailable("no free port found", hint="stop some engines or pass --port")
