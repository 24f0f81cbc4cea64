"""The gateway in a thread of this process: the same app and uvicorn server as `sage llm serve`.

For the library (`ControlPlane.serve(background=False)`): no child process, no signal
handlers (uvicorn installs none outside the main thread), no logging set-up, and no
record in the state file, so `sage llm serve --stop` never signals the program that
embeds it. The gateway stops with `stop()` or when the process exits.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from sagellm_cli.core.errors import OperationFailed

if TYPE_CHECKING:
    from sagellm_cli.core.state import StateStore
    from sagellm_cli.gateway.config import GatewayConfig
    from sagellm_cli.gateway.http.app import Gateway


class ThreadedGateway:
    """One gateway served by uvicorn on its own event loop in a daemon thread."""

    def __init__(self, config: GatewayConfig, store: StateStore | None = None):
        self.config = config
        self.store = store
        self.app: Gateway | None = None
        self._server = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """The base URL (no `/v1`)."""
        return self.config.url

    @property
    def running(self) -> bool:
        """True while the server thread serves."""
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 30.0) -> ThreadedGateway:
        """Bind (port 0 picks a free port), validate, start serving; return once it listens."""
        from sagellm_cli.gateway.http import server
        from sagellm_cli.gateway.http.app import create_app

        sock = server.bind_socket(self.config.host, self.config.port)
        try:
            self.config.port = sock.getsockname()[1]
            self.config.validate()
            self.app = create_app(self.config, self.store)
            # The same server `sage llm serve` runs, connection limits included.
            self._server = server.uvicorn_server(self.app, self.config, self._started.set, None)
        except BaseException:
            sock.close()
            raise

        def run() -> None:
            try:
                self._server.run(sockets=[sock])
            except BaseException as exc:  # noqa: BLE001 - reported by start() or stop()
                self._error = exc
            finally:
                sock.close()
                self._started.set()

        self._thread = threading.Thread(target=run, name=f"sagellm-gateway-{self.config.port}",
                                        daemon=True)  # fmt: skip
        self._thread.start()
        if not self._started.wait(timeout) or not self.running:
            self.stop()
            why = f": {type(self._error).__name__}: {self._error}" if self._error else ""
            raise OperationFailed(f"the in-process gateway did not start{why}")
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Stop serving (idempotent); in-flight requests get uvicorn's graceful shutdown."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(5.0)
