"""What the gateway itself reads from an inference request, shared by the proxy and the scheduler.

- the priority class and SLO deadline (headers first, then the gateway's body fields);
- `strip_gateway_fields`, which removes those body fields before the request is forwarded;
- `ProxyRequest`, the parsed request as the proxy hands it from one step to the next.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sagellm_cli.gateway.policies import DEFAULT_CLASS, deadline_ms, priority_class

if TYPE_CHECKING:
    from sagellm_cli.gateway.backend import Backend
    from sagellm_cli.gateway.endpoints import Endpoint
    from sagellm_cli.gateway.registry import ModelGroup
    from sagellm_cli.gateway.routing import RouteInfo

# Body fields that belong to the gateway, not the engine (vLLM's `priority` is an int).
BODY_PRIORITY = "priority"
BODY_DEADLINE = "slo_deadline_ms"
# ASGI header names arrive lower-cased.
HEADER_PRIORITY = b"x-priority"
HEADER_DEADLINE = b"x-slo-deadline-ms"


def classify(
    body: dict[str, Any], headers: Iterable[tuple[bytes, bytes]]
) -> tuple[str, float | None]:
    """The request's priority class and relative deadline in ms (None: no SLO).

    `X-Priority` / `X-SLO-Deadline-Ms` win over the body's `priority` / `slo_deadline_ms`;
    a missing or unknown class is `normal`.
    """
    cls = None
    rel_ms = None
    for name, value in headers:
        if name == HEADER_PRIORITY:
            cls = priority_class(value)
        elif name == HEADER_DEADLINE:
            rel_ms = deadline_ms(value)
    if cls is None:
        cls = priority_class(body.get(BODY_PRIORITY)) or DEFAULT_CLASS
    if rel_ms is None and BODY_DEADLINE in body:
        rel_ms = deadline_ms(body.get(BODY_DEADLINE))
    return cls, rel_ms


def strip_gateway_fields(body: dict[str, Any]) -> bool:
    """Drop the gateway-only body fields before forwarding; True if the body changed.

    A string `priority` is ours (critical|high|normal|low): vLLM's own `priority`
    is an integer and rejects strings, so strings are removed and integers pass
    through untouched. `slo_deadline_ms` is always ours.
    """
    changed = False
    if isinstance(body.get(BODY_PRIORITY), str):
        del body[BODY_PRIORITY]
        changed = True
    if BODY_DEADLINE in body:
        del body[BODY_DEADLINE]
        changed = True
    return changed


@dataclass(slots=True)
class ProxyRequest:
    """One parsed inference request on its way to an engine (one object, not ten arguments)."""

    send: Callable
    receive: Callable
    endpoint: Endpoint
    group: ModelGroup
    body: dict[str, Any]
    raw: bytes | None  # the body as received; None when it must be re-serialised
    info: RouteInfo
    stream: bool
    started: float  # time.perf_counter() on arrival
    first: Backend | None = None  # the engine whose slot the scheduler reserved
