"""Run the gateway under uvicorn (uvloop + httptools when installed) on a socket we bind.

Binding the socket ourselves turns "port in use" into a clean exit 4 instead of
a uvicorn log line, and lets the state-file record be written only once the
gateway really listens.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import socket
import sys
from collections.abc import Callable

from sagellm_cli.core import ports
from sagellm_cli.core.errors import BadInput, ResourceUnavailable
from sagellm_cli.gateway.config import GatewayConfig


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


def _uvicorn_server(app, config: GatewayConfig, on_started, on_stopped):
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started and on_started:
                on_started()

        async def shutdown(self, sockets=None):
            try:
                await super().shutdown(sockets)
            finally:
                if on_stopped:
                    on_stopped()

    uv_config = uvicorn.Config(
        app,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
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
    """Validate, bind, and serve until SIGINT/SIGTERM."""
    from sagellm_cli.gateway.app import create_app

    config.validate()
    sock = bind_socket(config.host, config.port)
    if config.port == 0:
        config.port = sock.getsockname()[1]
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    gateway = create_app(config)
    server = _uvicorn_server(gateway, config, on_started, on_stopped)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
