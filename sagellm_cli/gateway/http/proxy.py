"""The hot path: a raw ASGI handler for the proxied endpoints (gateway/http/endpoints.py).

Bodies pass through as bytes. The request JSON is parsed once, only to read
`model`, `stream`, `user` (and the prompt, lazily, for prefix/length routing);
it is re-serialised only when the request named an alias (label, model path,
engine id) and the engine expects its served name. SSE chunks are forwarded as
they arrive; a client that disconnects cancels the upstream request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from typing import TYPE_CHECKING, Any

from sagellm_cli.core import protocol
from sagellm_cli.gateway.admission.policies import engine_cost
from sagellm_cli.gateway.admission.scheduling import Rejected
from sagellm_cli.gateway.control.supervisor import WakeFailed
from sagellm_cli.gateway.http.auth import TokenCheck
from sagellm_cli.gateway.http.endpoints import PATH_FOR_KIND, Endpoint
from sagellm_cli.gateway.http.errors import error_body, send_json
from sagellm_cli.gateway.http.pd import KV_TRANSFER_PARAMS, run_prefill
from sagellm_cli.gateway.http.request import (
    BODY_COST_BUDGET,
    BODY_DEADLINE,
    BODY_PRIORITY,
    ProxyRequest,
    deadline_of,
    strip_gateway_fields,
)
from sagellm_cli.gateway.http.transport import direct_writer
from sagellm_cli.gateway.http.upstream import UpstreamConnectError
from sagellm_cli.gateway.routing.strategies import InvalidPrompt, RouteInfo
from sagellm_cli.gateway.telemetry.stats import GatewayStats

try:  # orjson is ~5x faster for the one parse we do; json is the fallback.
    import orjson

    _loads, _dumps = orjson.loads, orjson.dumps
    _DecodeError: type[Exception] = orjson.JSONDecodeError
except ImportError:  # pragma: no cover - depends on the environment
    import json

    _loads = json.loads

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj).encode()

    _DecodeError = ValueError

if TYPE_CHECKING:
    from sagellm_cli.gateway.admission.scheduling import Scheduler
    from sagellm_cli.gateway.config import GatewayConfig
    from sagellm_cli.gateway.control.supervisor import Supervisor
    from sagellm_cli.gateway.http.upstream import Upstream, UpstreamResponse
    from sagellm_cli.gateway.routing.backend import Backend
    from sagellm_cli.gateway.routing.registry import ModelGroup, Registry
    from sagellm_cli.gateway.telemetry.metrics import Metrics

log = logging.getLogger("sagellm.gateway")

_UPSTREAM_HEADERS = {"Content-Type": "application/json"}
_STREAM_HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream"}
# Raw ASGI header names (bytes), made once.
_HEADER_SESSION = protocol.HEADER_SESSION.encode()
_HEADER_ENGINE = protocol.HEADER_ENGINE.encode()
# OpenAI's names, then Anthropic's and the Responses API's.
_PROMPT_RE = re.compile(rb'"(?:prompt|input)_tokens"\s*:\s*(\d+)')
_COMPLETION_RE = re.compile(rb'"(?:completion|output)_tokens"\s*:\s*(\d+)')


# How to start an engine of each kind, for a request that finds none.
_START_HINT = {
    "llm": "start one with `sage llm engine start MODEL`",
    "embedding": "start one with `sage llm engine start all-MiniLM-L6-v2 --engine-kind embedding`",
}


class _ClientGone(Exception):
    """The client disconnected before its request body arrived."""


class _Failure(Exception):
    """An attempt failed before any byte reached the client: retryable."""

    def __init__(self, reason: str, status: int = 502, body: bytes | None = None, ctype=None):
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.body = body
        self.content_type = ctype


def _usage(data: bytes) -> tuple[int, int]:
    """prompt/completion tokens from a response tail, without parsing the whole body."""
    idx = data.rfind(b'"usage"')
    if idx < 0:
        return 0, 0
    p = _PROMPT_RE.search(data, idx)
    c = _COMPLETION_RE.search(data, idx)
    return (int(p.group(1)) if p else 0, int(c.group(1)) if c else 0)


class Proxy:
    """Routes and forwards one OpenAI request to an engine, with one retry elsewhere."""

    def __init__(
        self,
        config: GatewayConfig,
        registry: Registry,
        upstream: Upstream,
        metrics: Metrics,
        api_check: TokenCheck,
        scheduler: Scheduler | None = None,
        stats: GatewayStats | None = None,
        supervisor: Supervisor | None = None,
    ):
        self.config = config
        self.registry = registry
        self.upstream = upstream
        self.metrics = metrics
        self.api_check = api_check
        self.scheduler = scheduler
        # The sliding-window figures of /v1/management/metrics (stats.py).
        self.stats = stats if stats is not None else GatewayStats()
        self.max_body = config.max_body_bytes
        # Loads unloaded or sleeping engines for requests (None: such engines get 503).
        self.supervisor = supervisor

    # -- request parsing -----------------------------------------------------

    async def _read_body(self, scope, receive) -> bytes | None:
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    if int(value) > self.max_body:
                        return None
                except ValueError:
                    pass
                break
        # One chunk is the common case; many are joined once (not re-copied per chunk).
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            if chunk:
                chunks.append(chunk)
                size += len(chunk)
                if size > self.max_body:
                    return None
            more = message.get("more_body", False)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _resolve(self, kind: str, model: Any) -> tuple[ModelGroup | None, int, bytes]:
        """The model group, or an HTTP status and error body."""
        registry = self.registry
        if model is None:
            group = registry.default_group(kind)
            if group is None and not registry.model_names(kind):
                return None, 404, error_body(
                    404, f"no {kind} engine is running here ({_START_HINT[kind]})",
                    code="model_not_found", available=[],
                )  # fmt: skip
            if group is None:
                return (
                    None,
                    400,
                    error_body(
                        400,
                        "'model' is required",
                        code="model_required",
                        available=registry.model_names(kind),
                    ),
                )
            return group, 0, b""
        if not isinstance(model, str):
            return None, 400, error_body(400, "'model' must be a string", code="invalid_model")
        group = registry.group(kind, model)
        if group is not None:
            return group, 0, b""
        other = registry.other_kind(kind, model)
        if other is not None:
            where = PATH_FOR_KIND[other]
            return (
                None,
                400,
                error_body(
                    400,
                    f"model {model!r} is served by an {other} engine; send it to {where}",
                    code="wrong_endpoint",
                ),
            )
        available = registry.model_names(kind)
        return (
            None,
            404,
            error_body(
                404,
                f"model {model!r} is not served here; available: {', '.join(available) or 'none'}"
                f" ({_START_HINT[kind]})",
                code="model_not_found",
                available=available,
            ),
        )

    # -- the handler ---------------------------------------------------------

    async def handle(self, scope, receive, send, endpoint: Endpoint) -> None:
        """Serve one inference request end to end."""
        started = time.perf_counter()
        headers = scope["headers"]
        if not self.api_check.allows_raw(headers):
            await send_json(
                send,
                401,
                error_body(401, "invalid or missing API key", code="invalid_api_key"),
                [(b"www-authenticate", b"Bearer")],
            )
            return
        try:
            raw = await self._read_body(scope, receive)
        except _ClientGone:
            return
        if raw is None:
            await send_json(
                send,
                413,
                error_body(
                    413, f"request body exceeds {self.max_body} bytes", code="body_too_large"
                ),
            )
            return
        try:
            body = _loads(raw)
        except (_DecodeError, ValueError, TypeError, RecursionError):
            await send_json(
                send, 400, error_body(400, "request body is not valid JSON", code="invalid_json")
            )
            return
        if not isinstance(body, dict):
            await send_json(
                send,
                400,
                error_body(400, "request body must be a JSON object", code="invalid_json"),
            )
            return
        group, status, err = self._resolve(endpoint.kind, body.get("model"))
        if (group is None or not group.healthy) and await self.registry.refresh():
            # An engine started (or became ready) since the last poll of the state file:
            # `engine start` returned, so the request must not get a 404 or 503 for it.
            group, status, err = self._resolve(endpoint.kind, body.get("model"))
        if group is not None and not any(
            endpoint.served_by(b.record.runtime) for b in group.backends
        ):
            group, status, err = None, 400, _unsupported(endpoint, group)
        if group is None:
            # Unknown names are not used as label values: clients could grow them without bound.
            self.metrics.observe("", "", endpoint.name, status, time.perf_counter() - started)
            await send_json(send, status, err)
            return
        if not group.healthy and self.supervisor is not None:
            try:
                group = await self.supervisor.wake(group)
            except WakeFailed as exc:
                message = f"{exc}; try again later"
                await send_json(
                    send,
                    503,
                    error_body(503, message, code=exc.code),
                    [(b"retry-after", b"30")],
                )
                return
        stream = body.get("stream") is True and endpoint.streams
        session = body.get("user")
        if not isinstance(session, str):
            session = None
            for name, value in headers:
                if name == _HEADER_SESSION:
                    session = value.decode("latin-1")
                    break
        info = RouteInfo(body, session)
        if group.strategy.uses_prompt:
            try:
                info.prompt_text()
            except InvalidPrompt as exc:
                await send_json(send, 400, error_body(400, str(exc), code="invalid_messages"))
                return
            prepare = getattr(group.strategy, "prepare", None)  # `kv`: tokenize off the loop
            if prepare is not None:
                await prepare(group.backends, info)
        ticket = None
        first = None
        deadline = deadline_of(body, headers)
        if self.scheduler is not None:
            try:
                ticket = await self.scheduler.admit(group, body, info, headers, receive)
            except Rejected as exc:
                model = group.backends[0].served_model_name if group.backends else ""
                elapsed = time.perf_counter() - started
                self.metrics.observe(model, "", endpoint.name, exc.status, elapsed)
                self.stats.finished(model, None, exc.status, elapsed, deadline)
                await send_json(
                    send, exc.status, error_body(exc.status, exc.message, exc.code), exc.headers()
                )
                return
            first = getattr(ticket, "backend", None)
        if (
            BODY_PRIORITY in body or BODY_DEADLINE in body or BODY_COST_BUDGET in body
        ) and strip_gateway_fields(body):
            raw = None  # the gateway's own fields never reach the engine
        if KV_TRANSFER_PARAMS in body:
            # Where an engine pulls KV from (host, port) is the gateway's to say (gateway/http/pd.py).
            del body[KV_TRANSFER_PARAMS]
            raw = None
        req = ProxyRequest(send, receive, endpoint, group, body, raw, info, stream, started, first,
                           deadline_ms=deadline, cost_budget=getattr(ticket, "budget", None),
                           scope=scope)  # fmt: skip
        try:
            await self._forward(req)
        finally:
            if self.scheduler is not None:
                self.scheduler.release(ticket)

    async def _forward(self, req: ProxyRequest) -> None:
        """Send `req` to an engine; retry once elsewhere if it fails before any byte is sent."""
        send, group, body, info = req.send, req.group, req.body, req.info
        if group.strategy.disaggregated and not await run_prefill(self, req, _dumps, _loads):
            return  # the prefill engine failed or refused the request: answered
        first = req.first
        model = group.name
        tried: Backend | None = None
        last: _Failure | None = None
        for attempt in (0, 1):
            if first is not None and first.healthy and req.endpoint.served_by(first.record.runtime):
                # The scheduler reserved a slot on this engine (chosen by the same strategy).
                backend, first = first, None
            else:
                candidates = group.healthy
                if req.endpoint.runtimes is not None:  # a mixed group: only engines that serve it
                    candidates = [b for b in candidates if req.endpoint.served_by(b.record.runtime)]
                if tried is not None:
                    candidates = [b for b in candidates if b is not tried]
                if req.cost_budget is not None:  # a retry stays within the request's budget
                    candidates = [b for b in candidates if engine_cost(b) <= req.cost_budget]
                if not candidates:
                    break
                backend = group.strategy.choose(candidates, info)
            label = backend.served_model_name
            if attempt:
                self.metrics.retry(label)
            payload = req.raw
            target = group.adapter or label  # a LoRA adapter keeps its own name upstream
            if payload is None or body.get("model") != target:
                body["model"] = target
                try:
                    payload = _dumps(body)
                except (TypeError, ValueError, RecursionError):
                    # orjson refuses more than 255 levels: a body nobody needs.
                    await send_json(
                        send,
                        400,
                        error_body(
                            400, "the request body nests JSON too deeply", code="invalid_json"
                        ),
                    )
                    return
            backend.inflight += 1
            backend.requests += 1
            backend.last_used = time.monotonic()  # keep_alive counts from the last request
            status = 0
            failed = False
            try:
                if req.stream:
                    status = await self._stream(req, backend, payload, label)
                else:
                    status = await self._unary(send, backend, req.endpoint.path, payload, label)
                return
            except _Failure as failure:
                status = failure.status
                failed = True
                backend.errors += 1
                self.registry.mark_failure(backend, failure.reason)
                last = failure
                tried = backend
            finally:
                backend.inflight -= 1
                backend.last_used = time.monotonic()
                elapsed = time.perf_counter() - req.started
                self.metrics.observe(label, backend.id, req.endpoint.name, status, elapsed)
                if failed:  # may be retried: the request's outcome is recorded below
                    self.stats.attempt_failed(backend.id, elapsed)
                else:
                    self.stats.finished(label, backend.id, status, elapsed, req.deadline_ms)
        # Every try failed (or no engine was healthy): the answer below is the outcome.
        final = 503 if last is None else (last.status if last.body is not None else 502)
        served = group.backends[0].served_model_name if group.backends else model
        self.stats.finished(served, None, final, time.perf_counter() - req.started, req.deadline_ms)
        if last is not None and last.body is not None:
            # The engine answered 5xx on every try: pass its own error through.
            headers = [
                (b"content-type", (last.content_type or "application/json").encode()),
                (b"content-length", str(len(last.body)).encode()),
            ]
            await send({"type": "http.response.start", "status": last.status, "headers": headers})
            await send({"type": "http.response.body", "body": last.body})
            return
        if last is not None:
            message = f"engine for model {model!r} failed: {last.reason}"
            await send_json(send, 502, error_body(502, message, code="upstream_failed"))
            return
        ids = ", ".join(b.id for b in group.backends)
        await send_json(
            send,
            503,
            error_body(
                503,
                f"no ready engine for model {model!r} (engines: {ids}); "
                "check `sage llm engine list`",
                code="no_ready_engine",
            ),
            [(b"retry-after", b"2")],
        )

    async def _open(self, backend: Backend, path: str, payload: bytes, stream: bool):
        try:
            return await self.upstream.post(
                backend.url + path, payload, _STREAM_HEADERS if stream else _UPSTREAM_HEADERS
            )
        except UpstreamConnectError as exc:
            raise _Failure(str(exc)) from None

    async def _unary(self, send, backend: Backend, path: str, payload: bytes, model: str) -> int:
        resp = await self._open(backend, path, payload, False)
        try:
            data = await resp.read()
        except Exception as exc:  # noqa: BLE001 - nothing was sent yet: retryable
            raise _Failure(f"{type(exc).__name__} while reading the response") from None
        finally:
            await resp.close()
        status = resp.status
        if status >= 500:
            raise _Failure(f"engine answered {status}", status, data, resp.content_type)
        self.registry.mark_success(backend)
        if status == 200:
            prompt, completion = _usage(data)
            if prompt or completion:
                self.metrics.usage(model, prompt, completion)
                self.stats.tokens(model, backend.id, completion)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", resp.content_type.encode()),
                    (b"content-length", str(len(data)).encode()),
                    (_HEADER_ENGINE, backend.id.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": data})
        return status

    async def _stream(self, req: ProxyRequest, backend: Backend, payload: bytes, model: str) -> int:
        send = req.send
        resp = await self._open(backend, req.endpoint.path, payload, True)
        status = resp.status
        if status != 200 or not resp.content_type.startswith("text/event-stream"):
            # An error (or a non-stream answer): treat it like a unary response.
            try:
                data = await resp.read()
            except Exception as exc:  # noqa: BLE001
                raise _Failure(f"{type(exc).__name__} while reading the response") from None
            finally:
                await resp.close()
            if status >= 500:
                raise _Failure(f"engine answered {status}", status, data, resp.content_type)
            await send_json(send, status, data, [(_HEADER_ENGINE, backend.id.encode())])
            return status
        self.registry.mark_success(backend)
        # From here on bytes reach the client: no retry, errors become an SSE error event.
        try:
            await self._start_stream(req.send, resp, backend)
            writer = direct_writer(req.scope) if req.scope is not None else None
            if writer is not None:
                return await self._relay(req, resp, backend, model, writer)
            return await self._pump_watched(req, resp, backend, model)
        finally:
            await resp.close()

    async def _relay(self, req: ProxyRequest, resp, backend: Backend, model: str, writer) -> int:
        """Our own server: chunks go from the engine's connection callback to the client's
        transport, in this task: no task wake-up, no ASGI message per chunk, and no task
        waiting for a disconnect (the client's connection_lost aborts the relay)."""
        tap = _StreamTap(self, model, backend.id, req.endpoint.name, req.started, writer)
        if not writer.on_client_lost(lambda: resp.abort(_ClientGone())):
            return 499
        try:
            await resp.relay(tap, writer.drain)
        except _ClientGone:
            return 499  # closing the unfinished upstream exchange aborts the generation
        except Exception as exc:  # noqa: BLE001 - the stream broke after bytes were sent
            return await self._stream_broke(req.send, backend, exc)
        finally:
            writer.on_client_lost(None)
        return await self._stream_done(req.send, tap, model, backend)

    async def _pump_watched(self, req: ProxyRequest, resp, backend: Backend, model: str) -> int:
        """Another server (the in-process test transport): one ASGI message per chunk, and a
        second task that notices the client going away."""
        pump = asyncio.ensure_future(self._pump(req, resp, backend, model))
        watcher = asyncio.ensure_future(_wait_disconnect(req.receive))
        try:
            done, _ = await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if pump not in done:
                pump.cancel()  # the client went away: dropping the upstream aborts generation
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
                return 499
            return pump.result()
        finally:
            watcher.cancel()
            if not pump.done():
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump

    async def _pump(self, req: ProxyRequest, resp: UpstreamResponse, backend, model) -> int:
        send = req.send
        tap = _StreamTap(self, model, backend.id, req.endpoint.name, req.started, None)
        try:
            async for chunk in resp.chunks():
                tap(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the stream broke after bytes were sent
            return await self._stream_broke(send, backend, exc)
        return await self._stream_done(send, tap, model, backend)

    @staticmethod
    async def _start_stream(send, resp: UpstreamResponse, backend: Backend) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", resp.content_type.encode()),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),
                    (_HEADER_ENGINE, backend.id.encode()),
                ],
            }
        )

    async def _stream_broke(self, send, backend: Backend, exc: Exception) -> int:
        """The engine's stream failed after bytes reached the client: an SSE error event."""
        self.registry.mark_failure(backend, f"stream broke: {type(exc).__name__}")
        backend.errors += 1
        event = error_body(502, f"engine {backend.id} failed mid-stream: {type(exc).__name__}")
        await send(
            {
                "type": "http.response.body",
                "body": b"data: " + event + b"\n\ndata: [DONE]\n\n",
                "more_body": False,
            }
        )
        return 502

    async def _stream_done(self, send, tap: _StreamTap, model: str, backend: Backend) -> int:
        if tap.prompt or tap.completion:
            self.metrics.usage(model, tap.prompt, tap.completion)
            self.stats.tokens(model, backend.id, tap.completion)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return 200


class _StreamTap:
    """What the gateway reads from a stream on its way through: the time to the first
    chunk, and usage. Called once per chunk, so it does as little as it can: a substring
    test, and the usage regex only on the chunk that carries usage (the last, usually)."""

    __slots__ = ("proxy", "model", "engine", "endpoint", "started", "first", "write",
                 "prompt", "completion")  # fmt: skip

    def __init__(self, proxy: Proxy, model: str, engine: str, endpoint: str, started, writer):
        self.proxy = proxy
        self.model = model
        self.engine = engine
        self.endpoint = endpoint
        self.started = started
        self.first = True
        self.write = writer.write if writer is not None else None
        self.prompt = self.completion = 0

    def __call__(self, chunk: bytes) -> bool:
        if self.first:
            self.first = False
            ttft = time.perf_counter() - self.started
            self.proxy.metrics.first_token(self.model, self.endpoint, ttft)
            self.proxy.stats.first_token(self.model, self.engine, ttft)
        if b'"usage"' in chunk:
            # Anthropic splits usage over message_start (input) and message_delta
            # (output); OpenAI sends it once: the largest of each counts.
            p, c = _usage(chunk)
            if p > self.prompt:
                self.prompt = p
            if c > self.completion:
                self.completion = c
        write = self.write
        return True if write is None else write(chunk)


def _unsupported(endpoint: Endpoint, group: ModelGroup) -> bytes:
    """The 400 for a model whose engines are of a runtime that does not serve `endpoint`."""
    runtimes = ", ".join(sorted({b.record.runtime for b in group.backends}))
    return error_body(
        400,
        f"model {group.name!r} is served by a {runtimes} engine, which does not serve "
        f"{endpoint.path}; a vLLM engine does (start the model with `sage llm engine start "
        f"MODEL --engine-kind {endpoint.kind} --runtime vllm`)",
        code="unsupported_endpoint",
    )


async def _wait_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
