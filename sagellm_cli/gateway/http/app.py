"""Assembly: the Gateway object and its ASGI app.

The three inference endpoints are dispatched by a tiny ASGI function straight to
the proxy (no framework on the hot path); everything else (models, health,
metrics, management) is a Starlette app.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sagellm_cli.core import paths, protocol
from sagellm_cli.core.credentials import ensure_admin_token
from sagellm_cli.core.state import StateStore
from sagellm_cli.gateway.admission.scheduling import Scheduler, make_scheduler
from sagellm_cli.gateway.control.management import Management
from sagellm_cli.gateway.control.supervisor import Supervisor
from sagellm_cli.gateway.http.auth import RequestGuard, TokenCheck
from sagellm_cli.gateway.http.endpoints import BY_PATH
from sagellm_cli.gateway.http.errors import error_body, internal_error, send_json
from sagellm_cli.gateway.http.native import NativeUpstream
from sagellm_cli.gateway.http.proxy import Proxy
from sagellm_cli.gateway.routing.health import HealthChecker
from sagellm_cli.gateway.routing.registry import Registry
from sagellm_cli.gateway.telemetry.metrics import CONTENT_TYPE, Metrics
from sagellm_cli.gateway.telemetry.stats import GatewayStats

if TYPE_CHECKING:
    from sagellm_cli.gateway.config import GatewayConfig

log = logging.getLogger("sagellm.gateway")


def _json(data, status: int = 200) -> Response:
    return Response(json.dumps(data), status, media_type="application/json")


class Gateway:
    """Registry, upstream pool, health checker, metrics and routes of one gateway."""

    def __init__(
        self,
        config: GatewayConfig,
        store: StateStore | None = None,
        scheduler: Scheduler | None = None,
    ):
        # Refuse to start on a state dir others can write (it holds the token and records).
        paths.trusted_dir((store.path if store else paths.state_file()).parent)
        self.config = config
        self.started_at = time.time()
        self.registry = Registry(config, store or StateStore())
        self.upstream = NativeUpstream(config.connect_timeout_s)
        self.metrics = Metrics(self.registry)
        # Sliding-window aggregates for /v1/management/metrics, `sage llm top`, the library.
        self.stats = GatewayStats()
        if scheduler is None:
            scheduler = make_scheduler(
                config, self.registry, self.metrics.registry, stats=self.stats
            )
        self.scheduler = scheduler
        self.api_check = TokenCheck(config.api_key)
        # The management API always needs the admin token; the API key never opens it.
        if not config.admin_token:
            config.admin_token = ensure_admin_token()
        self.admin_check = TokenCheck(config.admin_token)
        self.guard = RequestGuard(config.host, config.allowed_hosts, config.allowed_origins)
        self.supervisor = Supervisor(
            config, self.registry, self.upstream, self.metrics.registry, self.registry.store
        )
        self.proxy = Proxy(
            config,
            self.registry,
            self.upstream,
            self.metrics,
            self.api_check,
            scheduler,
            stats=self.stats,
            supervisor=self.supervisor,
        )
        self.health = HealthChecker(
            self.registry, self.upstream, config.health_interval_s, config.health_timeout_s
        )
        self._tasks: list[asyncio.Task] = []
        self.management = Management(
            config, self.registry, self.admin_check, self.counters, self.stats_document
        )
        self.app = Starlette(
            routes=[
                Route(protocol.HEALTH, self.health_endpoint, methods=["GET"]),
                Route("/ready", self.ready_endpoint, methods=["GET"]),
                Route(protocol.MODELS, self.models_endpoint, methods=["GET"]),
                Route(protocol.METRICS, self.metrics_endpoint, methods=["GET"]),
                *self.management.routes(),
            ],
            lifespan=self.lifespan,
            exception_handlers={Exception: self._starlette_error},
        )

    # -- lifecycle -----------------------------------------------------------

    async def startup(self) -> None:
        """Open the upstream pool, load the engines, start the background loops."""
        await self.upstream.start()
        try:
            await self.registry.refresh(force=True)
        except Exception as exc:  # noqa: BLE001 - an unreadable state file is logged, not fatal
            log.warning("could not read the state file: %s", exc)
        self._tasks = [
            asyncio.create_task(self.registry.watch(), name="state-watch"),
            asyncio.create_task(self.health.run(), name="health"),
            asyncio.create_task(self.supervisor.run(), name="supervisor"),
            asyncio.create_task(self.metrics.probe_loop_lag(), name="loop-lag"),
        ]
        if self.registry.kv_index is not None:
            kv = self.registry.kv_index.run(self.registry.backends.values)
            self._tasks.append(asyncio.create_task(kv, name="kv-events"))

    async def shutdown(self) -> None:
        """Stop the loops and close the upstream pool."""
        await self.supervisor.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.upstream.close()

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        await self.startup()
        try:
            yield
        finally:
            await self.shutdown()

    # -- ASGI ----------------------------------------------------------------

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = self.guard.check(scope["headers"])
        if refused is not None:
            status, message = refused
            await send_json(send, status, error_body(status, message, code="forbidden"))
            return
        try:
            endpoint = BY_PATH.get(scope["path"])
            if endpoint is None:
                await self.app(scope, receive, send)
            elif scope["method"] == "POST":
                await self.proxy.handle(scope, receive, send, endpoint)
            else:
                body = error_body(405, f"use POST for {scope['path']}", code="method_not_allowed")
                await send_json(send, 405, body, [(b"allow", b"POST")])
        except Exception as exc:  # noqa: BLE001 - the last resort: never a traceback in a body
            if getattr(exc, "sagellm_error_id", None):
                return  # answered (and logged) by the Starlette handler already
            error_id, body = internal_error(exc, scope)
            # If the response had started, only the log line remains to tell.
            with contextlib.suppress(Exception):
                await send_json(send, 500, body)

    async def _starlette_error(self, request: Request, exc: Exception) -> Response:
        _, body = internal_error(exc, request.scope)
        return Response(body, 500, media_type="application/json")

    # -- small endpoints -----------------------------------------------------

    async def health_endpoint(self, request: Request) -> Response:
        return _json({"status": "ok"})

    async def ready_endpoint(self, request: Request) -> Response:
        ready = [b.id for b in self.registry.backends.values() if b.healthy]
        if ready:
            return _json({"status": "ready", "engines": ready})
        return _json({"status": "not ready", "engines": [], "reason": "no ready engine"}, 503)

    async def models_endpoint(self, request: Request) -> Response:
        if not self.api_check.allows(request.headers.get(protocol.AUTHORIZATION)):
            return Response(
                error_body(401, "invalid or missing API key", code="invalid_api_key"),
                401,
                media_type="application/json",
            )
        return _json(self.registry.models_document())

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    def stats_document(self, window: float) -> dict:
        """`GET /v1/management/metrics`: the last `window` seconds, per model and engine."""
        return self.stats.document(window, self.registry.backends.values(), self.scheduler)

    def counters(self) -> dict:
        """Gateway-wide counters for the management status document."""
        backends = list(self.registry.backends.values())
        return {
            "url": self.config.url,
            "routing": self.config.routing,
            "model_routing": self.config.model_routing,
            "started_at": self.started_at,
            "uptime_s": round(time.time() - self.started_at, 3),
            "engines": len(backends),
            "healthy_engines": sum(1 for b in backends if b.healthy),
            "inflight": sum(b.inflight for b in backends),
            "requests": sum(b.requests for b in backends),
            "errors": sum(b.errors for b in backends),
            "health_rounds": self.health.rounds,
            "state_generation": self.registry.generation,
            "supervisor": self.supervisor.status(),
            "scheduling": (
                self.scheduler.status() if self.scheduler is not None else {"policy": "none"}
            ),
        }


def create_app(config: GatewayConfig, store: StateStore | None = None) -> Gateway:
    """The ASGI app (a Gateway instance is itself the ASGI callable) for a validated config."""
    return Gateway(config, store)
