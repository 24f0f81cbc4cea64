"""The prefill step of P/D disaggregation (`pd` routing, docs/routing.md).

Before a chat or completions request goes to a decode engine, the prompt is sent to a
prefill engine of the same model with `max_tokens: 1`, `stream: false` and
`kv_transfer_params: {"do_remote_decode": true, ...}`: it computes the prompt's KV and keeps
it for a remote decode. Its answer's `kv_transfer_params` (where the KV is: engine id,
blocks, host, side-channel port) go into the decode request, whose engine then pulls the
KV through its connector (NixlConnector) instead of computing it. The client's answer, its
usage included, is the decode engine's.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol

from sagellm_cli.core import protocol
from sagellm_cli.gateway.http.errors import error_body, send_json
from sagellm_cli.gateway.http.upstream import UpstreamConnectError

if TYPE_CHECKING:
    from sagellm_cli.gateway.http.request import ProxyRequest
    from sagellm_cli.gateway.http.upstream import Upstream
    from sagellm_cli.gateway.routing.registry import Registry
    from sagellm_cli.gateway.telemetry.metrics import Metrics
    from sagellm_cli.gateway.telemetry.stats import GatewayStats


class ProxyParts(Protocol):
    """What the prefill step uses of gateway/http/proxy.py's Proxy (which calls it)."""

    upstream: Upstream
    metrics: Metrics
    registry: Registry
    stats: GatewayStats


# The body field of vLLM's KV connectors. A client's own is dropped by the proxy: it would
# tell a decode engine which host and port to pull KV from.
KV_TRANSFER_PARAMS = "kv_transfer_params"
# Only these carry a prompt whose KV the decode engine can take over.
PD_PATHS = frozenset({protocol.CHAT, protocol.COMPLETIONS})
# What a prefill request asks of the connector (the keys vLLM's own P/D proxy sends).
PREFILL_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
# Output-length fields the prefill request must not carry (max_tokens 1 says it all).
_DROPPED = ("max_completion_tokens", "min_tokens", "stream_options", "n", "best_of")
_HEADERS = {"Content-Type": "application/json"}
_HEADER_ENGINE = protocol.HEADER_ENGINE.encode()


def prefill_body(body: dict[str, Any], model: str) -> dict[str, Any]:
    """The prefill request for `body`: the same prompt and sampling, one token, no stream."""
    out = {k: v for k, v in body.items() if k not in _DROPPED}
    out.update(model=model, max_tokens=1, stream=False)
    out[KV_TRANSFER_PARAMS] = PREFILL_PARAMS
    return out


async def run_prefill(proxy: ProxyParts, req: ProxyRequest, dumps, loads) -> bool:
    """Run the prefill step for `req` and put its `kv_transfer_params` into `req.body`.

    True: go on to the decode engine (also when no prefill engine is healthy: the decode
    engine then computes the prompt itself). False: the answer was sent (the prefill
    engine's own 4xx, or a 502 naming it).
    """
    group, body = req.group, req.body
    backend = group.strategy.prefill_backend(group.healthy)  # type: ignore[attr-defined]
    if backend is None or req.endpoint.path not in PD_PATHS:
        return True
    label = backend.served_model_name
    payload = dumps(prefill_body(body, group.adapter or label))
    backend.inflight += 1
    backend.requests += 1
    backend.last_used = time.monotonic()
    reason = None
    status = 0
    data = b""
    try:
        resp = await proxy.upstream.post(backend.url + req.endpoint.path, payload, _HEADERS)
        try:
            data = await resp.read()
            status = resp.status
        finally:
            await resp.close()
    except UpstreamConnectError as exc:
        reason = str(exc)
    except Exception as exc:  # noqa: BLE001 - a broken read: answered below, no hang
        reason = f"{type(exc).__name__} while reading the response"
    finally:
        backend.inflight -= 1
        backend.last_used = time.monotonic()
    params = None
    if reason is None and status == 200:
        try:
            params = loads(data).get(KV_TRANSFER_PARAMS)
        except Exception:  # noqa: BLE001 - not JSON, or not an object
            reason = "its answer is not a JSON object"
    elif reason is None and status >= 500:
        reason = f"it answered {status}"
    elapsed = time.perf_counter() - req.started
    proxy.metrics.observe(label, backend.id, "prefill", status or 502, elapsed)
    if reason is not None:
        backend.errors += 1
        proxy.registry.mark_failure(backend, f"prefill failed: {reason}")
        proxy.stats.finished(label, backend.id, 502, elapsed, req.deadline_ms)
        message = f"prefill engine {backend.id} for model {group.name!r} failed: {reason}"
        await send_json(req.send, 502, error_body(502, message, code="prefill_failed"))
        return False
    if status != 200:  # the request itself is wrong (a 4xx): the client gets the engine's words
        proxy.registry.mark_success(backend)
        proxy.stats.finished(label, backend.id, status, elapsed, req.deadline_ms)
        await send_json(req.send, status, data, [(_HEADER_ENGINE, backend.id.encode())])
        return False
    proxy.registry.mark_success(backend)
    if isinstance(params, dict):
        body[KV_TRANSFER_PARAMS] = params
        req.raw = None  # the decode request is re-serialised with them
    return True
