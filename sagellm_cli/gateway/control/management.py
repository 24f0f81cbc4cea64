"""The management API (seed 003): the same EngineManager calls as `sage llm engine`.

Every blocking call (spawning, waiting for readiness, stopping, reading NVML)
runs in a worker thread, so the event loop keeps proxying meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sagellm_cli.core import protocol
from sagellm_cli.core.credentials import env_allowed_remotely
from sagellm_cli.core.errors import BadInput, ExitCode, SageError
from sagellm_cli.core.inputs.engine_args import refused_api_arg
from sagellm_cli.core.records import EngineSpec
from sagellm_cli.gateway.http.auth import is_loopback
from sagellm_cli.gateway.http.errors import (
    BodyTooLarge,
    error_body,
    parse_json,
    sage_error_body,
    status_for,
)

if TYPE_CHECKING:
    from sagellm_cli.gateway.config import GatewayConfig
    from sagellm_cli.gateway.http.auth import TokenCheck
    from sagellm_cli.gateway.routing.registry import Registry

# The `engine start` option names the API accepts besides EngineSpec's own fields.
_ALIASES = {"engine_kind": "kind", "tp": "tensor_parallel", "pp": "pipeline_parallel"}


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data, default=str), status, media_type="application/json")


def _error(status: int, message: str, code: str, headers: dict | None = None) -> Response:
    return Response(error_body(status, message, code=code), status,
                    media_type="application/json", headers=headers)  # fmt: skip


class Forbidden(SageError):
    """A management request asks for something only the machine's own user may do (403)."""

    exit_code = ExitCode.BAD_INPUT


def spec_from_body(body: Any, *, allow_remote_config: bool = False) -> EngineSpec:
    """Validate a POST body with the same strict model as presets, then apply the API's limits.

    Without `allow_remote_config` a request may not set env outside the allow-list, bind
    the engine off loopback, or pass flags outside core/inputs/engine_args.API_ENGINE_FLAGS
    (see docs/security.md).
    """
    from sagellm_cli.core.inputs.spec_schema import parse_engine_options

    if isinstance(body, dict):
        body = {_ALIASES.get(k, k): v for k, v in body.items()}
    spec = parse_engine_options(body, what="engine spec")
    if allow_remote_config:
        return spec
    flag = "start the gateway with --allow-remote-engine-config to allow it"
    for name in spec.env:
        if not env_allowed_remotely(name):
            raise Forbidden(
                f"env {name!r} may not be set through the API (it could run code)",
                hint=f"allowed: the exact names listed in docs/security.md; {flag}",
            )
    if not is_loopback(spec.host):
        raise Forbidden(f"engines started through the API bind loopback only, not {spec.host!r}",
                        hint=flag)  # fmt: skip
    from sagellm_cli.core.launchers.ray import cluster_address

    if cluster_address(spec):  # a Ray node's engine binds the node's address (docs/cluster.md)
        raise Forbidden("engines on a Ray cluster bind their node's address, not loopback",
                        hint=flag)  # fmt: skip
    refused = refused_api_arg(spec.extra_args)
    if refused is not None:
        arg, why = refused
        raise Forbidden(f"extra arg {arg[:80]!r} is refused through the API: {why}",
                        hint=f"flags that cannot load code are listed in docs/security.md; "
                        f"{flag}")  # fmt: skip
    return spec


def _query_float(request: Request, name: str, default: float) -> float:
    """A finite, non-negative number from the query string (400 naming it otherwise)."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise BadInput(f"query parameter {name!r} must be a number of seconds >= 0, not {raw!r}")
    return value


def _query_bool(request: Request, name: str, default: bool) -> bool:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise BadInput(f"query parameter {name!r} must be true or false, not {raw!r}")


class Management:
    """Starlette routes under /v1/management, guarded by the admin token."""

    def __init__(
        self,
        config: GatewayConfig,
        registry: Registry,
        admin_check: TokenCheck,
        counters: Callable[[], dict[str, Any]],
        stats_document: Callable[[float], dict[str, Any]] | None = None,
    ):
        from sagellm_cli.core.engines.manager import EngineManager

        self.config = config
        self.registry = registry
        self.admin_check = admin_check
        self.counters = counters
        self.stats_document = stats_document
        self.manager = EngineManager(registry.store)

    def routes(self) -> list[Route]:
        """The management routes."""
        ENGINES = protocol.MANAGEMENT_ENGINES  # noqa: N806 - a route, read as a constant
        return [
            Route(ENGINES, self.guard(self.list_engines), methods=["GET"]),
            Route(ENGINES, self.guard(self.start_engine), methods=["POST"]),
            Route(
                ENGINES + "/register",
                self.guard(self.register_engine),
                methods=["POST"],
            ),
            Route(
                ENGINES + "/{engine_id}",
                self.guard(self.get_engine),
                methods=["GET"],
            ),
            Route(
                ENGINES + "/{engine_id}",
                self.guard(self.stop_engine),
                methods=["DELETE"],
            ),
            Route(
                protocol.MANAGEMENT_ENGINES + "/{engine_id}/hold",
                self.guard(self.hold_engine),
                methods=["POST"],
            ),
            Route(protocol.MANAGEMENT + "/status", self.guard(self.status), methods=["GET"]),
            Route(protocol.MANAGEMENT_METRICS, self.guard(self.metrics), methods=["GET"]),
            Route(protocol.MANAGEMENT + "/gpu", self.guard(self.gpu), methods=["GET"]),
        ]

    def guard(self, handler):
        """Admin token, JSON content type and body limit; SageErrors become JSON errors."""

        async def endpoint(request: Request) -> Response:
            if not self.admin_check.allows(request.headers.get(protocol.AUTHORIZATION)):
                return _error(401, "invalid or missing admin token", "invalid_admin_token",
                              {"www-authenticate": "Bearer"})  # fmt: skip
            if request.method == "POST":
                ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
                if ctype != "application/json":
                    return _error(415, "management requests must be Content-Type: "
                                  "application/json", "unsupported_media_type")  # fmt: skip
            try:
                return await handler(request)
            except BodyTooLarge as exc:
                return _error(413, str(exc), "body_too_large")
            except Forbidden as exc:
                return _error(403, exc.one_line(), "forbidden")
            except SageError as exc:
                return Response(
                    sage_error_body(exc), status_for(exc), media_type="application/json"
                )

        return endpoint

    async def _body(self, request: Request) -> Any:
        """The JSON body, read up to --max-body-mb (413 beyond), parsed safely (400)."""
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(f"request body exceeds {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"request body exceeds {limit} bytes")
            chunks.append(chunk)
        return parse_json(b"".join(chunks))

    async def list_engines(self, request: Request) -> Response:
        include_all = _query_bool(request, "all", False)
        records = await asyncio.to_thread(self.manager.list, include_all=include_all)
        return _json([r.to_dict() for r in records])

    async def get_engine(self, request: Request) -> Response:
        record = await asyncio.to_thread(self.manager.get, request.path_params["engine_id"])
        return _json(record.to_dict())

    async def start_engine(self, request: Request) -> Response:
        body = await self._body(request)
        spec = spec_from_body(body, allow_remote_config=self.config.allow_remote_engine_config)
        wait = _query_bool(request, "wait", True)
        timeout = _query_float(request, "timeout", 600.0)
        record = await asyncio.to_thread(self.manager.start, spec, wait=wait, timeout=timeout)
        await self.registry.refresh(force=True)
        return _json(record.to_dict(), 201 if wait else 202)

    async def register_engine(self, request: Request) -> Response:
        from sagellm_cli.core.engines.external import is_link_local, parse_registration, register

        registration = parse_registration(await self._body(request))
        if is_link_local(registration.url) and not self.config.allow_remote_engine_config:
            raise Forbidden(
                f"'url': {registration.url} is a link-local or unspecified address",
                hint="start the gateway with --allow-remote-engine-config to allow it",
            )
        record = await asyncio.to_thread(register, self.manager, registration)
        await self.registry.refresh(force=True)
        return _json(record.to_dict(), 201)

    async def stop_engine(self, request: Request) -> Response:
        timeout = _query_float(request, "timeout", 30.0)
        record = await asyncio.to_thread(
            self.manager.stop, request.path_params["engine_id"], timeout=timeout
        )
        await self.registry.refresh(force=True)
        return _json(record.to_dict())

    async def hold_engine(self, request: Request) -> Response:
        """A lease, as `sage llm engine hold`: body {"for": "10m"} (or seconds; 0 ends it)."""
        from sagellm_cli.core.inputs.durations import parse_duration

        body = await self._body(request)
        if not isinstance(body, dict) or "for" not in body:
            raise BadInput("'for' is required", hint='send {"for": "10m"} (0 ends the lease)')
        try:
            seconds = parse_duration(body["for"])
        except ValueError as exc:
            raise BadInput(f"'for': {exc}") from None
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, float)
            or not math.isfinite(seconds)
        ):
            raise BadInput("'for' must be a duration", hint='e.g. "10m" or 600 (0 ends the lease)')
        record = await asyncio.to_thread(
            self.manager.hold, request.path_params["engine_id"], seconds
        )
        await self.registry.refresh(force=True)
        return _json(record.to_dict())

    async def metrics(self, request: Request) -> Response:
        """Aggregates over `?window=` seconds (default 60): per model, per engine, in total."""
        from sagellm_cli.gateway.telemetry.stats import parse_window

        window = parse_window(request.query_params.get("window"))
        if self.stats_document is None:
            return _error(404, "this gateway keeps no aggregate metrics", "not_found")
        return _json(self.stats_document(window))

    async def gpu(self, request: Request) -> Response:
        return _json(await asyncio.to_thread(_gpu_document))

    async def status(self, request: Request) -> Response:
        gpus = await asyncio.to_thread(_gpu_document)
        records = await asyncio.to_thread(self.manager.list, include_all=False, probe_health=False)
        return _json(
            {
                "gateway": self.counters(),
                "engines": [r.to_dict() for r in records],
                "routing": [b.to_dict() for b in self.registry.backends.values()],
                "gpu": gpus,
            }
        )


def _gpu_document() -> dict[str, Any]:
    """What `sage llm gpu --json` prints: inventory plus reservations; never raises."""
    from sagellm_cli.core.engines.monitor import gpu_document

    return gpu_document()


def uptime(started: float) -> float:
    """Seconds since `started`."""
    return round(time.time() - started, 3)
