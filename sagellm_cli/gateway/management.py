"""The management API (seed 003): the same EngineManager calls as `sage llm engine`.

Every blocking call (spawning, waiting for readiness, stopping, reading NVML)
runs in a worker thread, so the event loop keeps proxying meanwhile.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sagellm_cli.core.errors import BadInput, SageError
from sagellm_cli.core.models import EngineSpec
from sagellm_cli.gateway.errors import error_body, sage_error_body, status_for

if TYPE_CHECKING:
    from sagellm_cli.gateway.app import Gateway

# The `engine start` option names the API accepts besides EngineSpec's own fields.
_ALIASES = {"engine_kind": "kind", "tp": "tensor_parallel", "pp": "pipeline_parallel"}
_SPEC_FIELDS = {f.name for f in dataclasses.fields(EngineSpec)}


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data, default=str), status, media_type="application/json")


def spec_from_body(body: Any) -> EngineSpec:
    """Validate the POST body against EngineSpec's fields (unknown keys are an error)."""
    if not isinstance(body, dict):
        raise BadInput("the request body must be a JSON object with at least 'model'")
    data = {_ALIASES.get(k, k): v for k, v in body.items()}
    unknown = sorted(set(data) - _SPEC_FIELDS)
    if unknown:
        raise BadInput(
            f"unknown field(s): {', '.join(unknown)}",
            hint=f"accepted: {', '.join(sorted(_SPEC_FIELDS))}",
        )
    if "model" not in data:
        raise BadInput("'model' is required")
    try:
        spec = EngineSpec(**data)
    except TypeError as exc:
        raise BadInput(f"invalid engine spec: {exc}") from None
    if spec.kind not in ("llm", "embedding"):
        raise BadInput(f"unknown engine kind {spec.kind!r}", hint="use llm or embedding")
    return spec


class Management:
    """Starlette routes under /v1/management, guarded by the admin token."""

    def __init__(self, gateway: Gateway):
        self.gw = gateway
        from sagellm_cli.core.engines import EngineManager

        self.manager = EngineManager(gateway.registry.store)

    def routes(self) -> list[Route]:
        """The management routes."""
        return [
            Route("/v1/management/engines", self.guard(self.list_engines), methods=["GET"]),
            Route("/v1/management/engines", self.guard(self.start_engine), methods=["POST"]),
            Route(
                "/v1/management/engines/{engine_id}",
                self.guard(self.get_engine),
                methods=["GET"],
            ),
            Route(
                "/v1/management/engines/{engine_id}",
                self.guard(self.stop_engine),
                methods=["DELETE"],
            ),
            Route("/v1/management/status", self.guard(self.status), methods=["GET"]),
            Route("/v1/management/gpu", self.guard(self.gpu), methods=["GET"]),
        ]

    def guard(self, handler):
        """Check the admin token and turn SageErrors into JSON errors."""

        async def endpoint(request: Request) -> Response:
            if not self.gw.admin_check.allows(request.headers.get("authorization")):
                return Response(
                    error_body(401, "invalid or missing admin token", code="invalid_admin_token"),
                    401,
                    media_type="application/json",
                    headers={"www-authenticate": "Bearer"},
                )
            try:
                return await handler(request)
            except SageError as exc:
                return Response(
                    sage_error_body(exc), status_for(exc), media_type="application/json"
                )

        return endpoint

    async def list_engines(self, request: Request) -> Response:
        include_all = request.query_params.get("all", "false").lower() in ("1", "true", "yes")
        records = await asyncio.to_thread(self.manager.list, include_all=include_all)
        return _json([r.to_dict() for r in records])

    async def get_engine(self, request: Request) -> Response:
        record = await asyncio.to_thread(self.manager.get, request.path_params["engine_id"])
        return _json(record.to_dict())

    async def start_engine(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body() or b"null")
        except ValueError:
            raise BadInput("the request body is not valid JSON") from None
        spec = spec_from_body(body)
        wait = request.query_params.get("wait", "true").lower() not in ("0", "false", "no")
        timeout = float(request.query_params.get("timeout", "600"))
        record = await asyncio.to_thread(self.manager.spawn, spec)
        if not wait:
            await self.gw.registry.refresh(force=True)
            return _json(record.to_dict(), 202)
        record = await asyncio.to_thread(self.manager.wait_ready, record.id, timeout=timeout)
        await self.gw.registry.refresh(force=True)
        return _json(record.to_dict(), 201)

    async def stop_engine(self, request: Request) -> Response:
        timeout = float(request.query_params.get("timeout", "30"))
        record = await asyncio.to_thread(
            self.manager.stop, request.path_params["engine_id"], timeout=timeout
        )
        await self.gw.registry.refresh(force=True)
        return _json(record.to_dict())

    async def gpu(self, request: Request) -> Response:
        return _json(await asyncio.to_thread(_gpu_document))

    async def status(self, request: Request) -> Response:
        gpus = await asyncio.to_thread(_gpu_document)
        records = await asyncio.to_thread(self.manager.list, include_all=False, probe_health=False)
        return _json(
            {
                "gateway": self.gw.counters(),
                "engines": [r.to_dict() for r in records],
                "routing": [b.to_dict() for b in self.gw.registry.backends.values()],
                "gpu": gpus,
            }
        )


def _gpu_document() -> dict[str, Any]:
    """What `sage llm gpu --json` prints: inventory plus reservations; never raises."""
    try:
        from sagellm_cli.core.engines import EngineManager
        from sagellm_cli.core.gpu import gpu_snapshot

        return gpu_snapshot(EngineManager().snapshot()).to_dict()
    except Exception as exc:  # noqa: BLE001 - GPU info is optional in a status document
        return {"nvml": False, "gpus": [], "reason": f"{type(exc).__name__}: {exc}"}


def uptime(started: float) -> float:
    """Seconds since `started`."""
    return round(time.time() - started, 3)
