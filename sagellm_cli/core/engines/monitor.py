"""What `sage llm top`, `serve --status` and the library read about a running system.

- `recorded_gateway`: the live gateway of this state directory (read only, no write);
- `fetch_metrics`: a gateway's `GET /v1/management/metrics` (admin token), stdlib HTTP;
- `gpu_document`: what `sage llm gpu --json` prints, never raising;
- `top_document`: engines, GPUs and the gateway's aggregates in one JSON document.

No gateway import here (core never imports the gateway): the metrics arrive as the
gateway's JSON document.
"""

from __future__ import annotations

import http.client
import json
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

from sagellm_cli.core import protocol
from sagellm_cli.core.engines import probe
from sagellm_cli.core.errors import BadInput, NotFound, OperationFailed

if TYPE_CHECKING:
    from sagellm_cli.core.engines.manager import EngineManager
    from sagellm_cli.core.records import GatewayRecord
    from sagellm_cli.core.state import State, StateStore

METRICS_PATH = protocol.MANAGEMENT_METRICS


def recorded_gateway(store: StateStore | None = None) -> GatewayRecord | None:
    """The gateway recorded in the state file if its process still runs, else None."""
    from sagellm_cli.core.engines.supervision import gateway_alive
    from sagellm_cli.core.state import StateStore

    record = (store or StateStore()).read().gateway
    return record if gateway_alive(record) else None


def gateway_url(store: StateStore | None = None) -> str:
    """The running local gateway's base URL (no `/v1`); NotFound when none is recorded."""
    record = recorded_gateway(store)
    if record is None:
        from sagellm_cli.core import paths

        raise NotFound(
            f"no running gateway is recorded in {paths.state_file()}",
            hint="start one with `sage llm serve --background`, or pass its URL",
        )
    return record.url


def fetch_metrics(
    url: str, admin_token: str | None, window: float = 60.0, timeout: float = 5.0
) -> dict[str, Any]:
    """A gateway's aggregate metrics document for the last `window` seconds.

    Raises OperationFailed when the gateway can't be reached or answers an error
    (a wrong admin token names the token's sources in the hint).
    """
    from sagellm_cli.core.credentials import ADMIN_TOKEN_ENV

    if not (0 < window <= 600):
        raise BadInput(f"window must be in (0, 600] seconds, not {window!r}", hint="e.g. 60")
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise BadInput(f"gateway URL {url!r} is not http://HOST:PORT")
    headers = protocol.bearer(admin_token)
    query = f"{METRICS_PATH}?{urlencode({'window': window})}"
    try:
        status, body = probe.get(url, query, timeout, headers)
    except (OSError, http.client.HTTPException) as exc:
        raise OperationFailed(
            f"cannot reach the gateway at {url}: {exc}",
            hint="is it running? see `sage llm serve --status`",
        ) from None
    if status == 401:
        raise OperationFailed(
            f"the gateway at {url} refused the admin token",
            hint=f"set {ADMIN_TOKEN_ENV} to the token it was started with",
        )
    if status != 200:
        raise OperationFailed(f"the gateway at {url} answered {status} for {METRICS_PATH}")
    try:
        return json.loads(body)
    except ValueError:
        raise OperationFailed(f"the gateway at {url} sent metrics that are not JSON") from None


def gpu_document(state: State | None = None) -> dict[str, Any]:
    """Inventory plus reservations, as `sage llm gpu --json`; an error becomes `reason`."""
    try:
        from sagellm_cli.core.engines.manager import EngineManager
        from sagellm_cli.core.gpu import gpu_snapshot

        return gpu_snapshot(state if state is not None else EngineManager().snapshot()).to_dict()
    except Exception as exc:  # noqa: BLE001 - GPU info is optional in a status document
        return {"nvml": False, "gpus": [], "reason": f"{type(exc).__name__}: {exc}"}


def top_document(
    manager: EngineManager,
    *,
    url: str | None = None,
    admin_token: str | None = None,
    window: float = 60.0,
) -> dict[str, Any]:
    """One `sage llm top --json` document: engines, GPUs, and the gateway's aggregates.

    Without `url` the recorded gateway is read; with none running, `gateway` and
    `metrics` are null. A gateway that can't be read gives `metrics_error` instead.
    """
    from sagellm_cli.core.credentials import read_admin_token

    records = manager.list(include_all=False)
    gateway: dict[str, Any] | None = None
    metrics = error = None
    if url is None:
        record = recorded_gateway(manager.store)
        url = record.url if record is not None else None
    if url is not None:
        gateway = {"url": url}
        try:
            metrics = fetch_metrics(url, admin_token or read_admin_token(), window)
        except (OperationFailed, BadInput) as exc:
            error = exc.one_line()
    return {
        "at": time.time(),
        "window_s": window,
        "engines": [r.to_dict() for r in records],
        "gpus": gpu_document(manager.snapshot()),
        "gateway": gateway,
        "metrics": metrics,
        "metrics_error": error,
    }
