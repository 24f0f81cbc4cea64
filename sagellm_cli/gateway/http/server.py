"""Run the gateway under uvicorn (uvloop + httptools when installed) on a socket we bind.

Binding the socket ourselves turns "port in use" into a clean exit 4 instead of
a uvicorn log line, and lets the state-file record be written only once the
gateway really listens. Connection-level limits (connection cap, request-head size
and deadline) live in transport.py; the open-file limit is raised here at start.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import resource
import socket
import sys
from collections.abc import Callable

from sagellm_cli.core.errors import BadInput, ResourceUnavailable
from sagellm_cli.core.launchers import ports
from sagellm_cli.gateway.config import GatewayConfig

log = logging.getLogger("sagellm.gateway")

# The soft RLIMIT_NOFILE is raised to the hard limit, but no further than this.
NOFILE_TARGET = 65536
# File descriptors kept out of the connection cap: logs, the state file, listeners, ...
# The rest is split between client connections and upstream ones (one per request at most).
FD_RESERVE = 128


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or exit 4 when the port is taken."""
    try:
        sock = ports.bind_socket(host, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ResourceUnavailable(
                f"port {port} on {host} is already in use",
                hint="pick another --port or stop what listens there",
            ) from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise BadInput(f"cannot bind {host}: no such local address") from None
        raise
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def raise_nofile_limit(target: int = NOFILE_TARGET) -> int:
    """Raise the soft open-file limit towards the hard one (never lower it); the new soft limit.

    The default soft limit (often 1024) is what let ~1,000 idle connections lock
    everyone out; raising it costs nothing until the descriptors are used.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = target if hard == resource.RLIM_INFINITY else min(hard, target)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as exc:  # e.g. a sandbox that forbids it
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, want, exc)
    return soft


def connection_cap(config: GatewayConfig, nofile: int) -> int:
    """config.max_connections, lowered to what the open-file limit can actually serve."""
    if nofile == resource.RLIM_INFINITY:
        return config.max_connections
    fits = max(16, (nofile - FD_RESERVE) // 2)
    if config.max_connections > fits:
        log.warning(
            "open-file limit %d allows %d client connections, not %d: raise `ulimit -Hn`",
            nofile,
            fits,
            config.max_connections,
        )
        return fits
    return config.max_connections


def uvicorn_server(app, config: GatewayConfig, on_started, on_stopped, max_connections=None):
    import uvicorn

    guard = None
    if importlib.util.find_spec("httptools"):
        from sagellm_cli.gateway.http import transport

        guard = transport.ConnectionGuard(
            max_connections=max_connections or config.max_connections,
            max_header_bytes=config.max_header_bytes,
            header_timeout_s=config.header_timeout_s,
            body_timeout_s=config.body_timeout_s,
        )
        http = transport.protocol_class(guard)
    else:  # uvicorn[standard] installs httptools; h11 bounds only the head size
        http = "h11"
        log.warning("httptools is not installed: no connection cap or request deadlines")

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started and on_started:
                on_started()

        async def shutdown(self, sockets=None):
            try:
                await super().shutdown(sockets)
            finally:
                if guard is not None:
                    guard.stop()
                if on_stopped:
                    on_stopped()

    uv_config = uvicorn.Config(
        app,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http=http,
        timeout_keep_alive=config.keep_alive_timeout_s,
        h11_max_incomplete_event_size=config.max_header_bytes,
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        server_header=False,
        # No proxy-headers middleware: one less ASGI layer per request.
        proxy_headers=False,
        date_header=False,
    )
    return Server(uv_config)


def serve(
    config: GatewayConfig,
    *,
    on_started: Callable[[], None] | None = None,
    on_stopped: Callable[[], None] | None = None,
) -> None:
    """Bind and serve a validated config until SIGINT/SIGTERM."""
    from sagellm_cli.gateway.http.app import create_app

    sock = bind_socket(config.host, config.port)
    if config.port == 0:
        config.port = sock.getsockname()[1]
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    cap = connection_cap(config, raise_nofile_limit())
    gateway = create_app(config)
    server = uvicorn_server(gateway, config, on_started, on_stopped, max_connections=cap)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
