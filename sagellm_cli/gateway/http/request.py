"""What the gateway itself reads from an inference request, shared by the proxy and the scheduler.

- the priority class and SLO deadline (headers first, then the gateway's body fields);
- the cost budget (`X-Cost-Budget`, else the body's `cost_budget`), for the scheduler;
- `strip_gateway_fields`, which removes those body fields before the request is forwarded;
- `ProxyRequest`, the parsed request as the proxy hands it from one step to the next.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sagellm_cli.core import protocol
from sagellm_cli.core.protocol import priority_class
from sagellm_cli.gateway.admission.policies import DEFAULT_CLASS, deadline_ms

if TYPE_CHECKING:
    from sagellm_cli.gateway.http.endpoints import Endpoint
    from sagellm_cli.gateway.routing.backend import Backend
    from sagellm_cli.gateway.routing.registry import ModelGroup
    from sagellm_cli.gateway.routing.strategies import RouteInfo

# Body fields that belong to the gateway, not the engine (vLLM's `priority` is an int).
BODY_PRIORITY = "priority"
BODY_DEADLINE = "slo_deadline_ms"
BODY_COST_BUDGET = "cost_budget"
# ASGI header names arrive lower-cased.
HEADER_PRIORITY = protocol.HEADER_PRIORITY.encode()
HEADER_DEADLINE = protocol.HEADER_DEADLINE.encode()
HEADER_COST_BUDGET = protocol.HEADER_COST_BUDGET.encode()


class InvalidBudget(ValueError):
    """A cost budget that is not a finite number >= 0 (answered 400)."""


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


def deadline_of(body: dict[str, Any], headers: Iterable[tuple[bytes, bytes]]) -> float | None:
    """The request's relative deadline in ms (`X-SLO-Deadline-Ms`, else the body field)."""
    for name, value in headers:
        if name == HEADER_DEADLINE:
            ms = deadline_ms(value)
            if ms is not None:
                return ms
            break
    return deadline_ms(body.get(BODY_DEADLINE)) if BODY_DEADLINE in body else None


def cost_budget(body: dict[str, Any], headers: Iterable[tuple[bytes, bytes]]) -> float | None:
    """The most this request may cost per 1k tokens (`X-Cost-Budget`, else `cost_budget`).

    None when absent. A value that is not a finite number >= 0 raises InvalidBudget: a
    budget silently ignored could send the request to an engine it can't afford.
    """
    raw: Any = None
    for name, value in headers:
        if name == HEADER_COST_BUDGET:
            raw = value.decode("latin-1")
            break
    else:
        if BODY_COST_BUDGET not in body:
            return None
        raw = body[BODY_COST_BUDGET]
    try:
        budget = float(raw) if not isinstance(raw, bool) else math.nan
    except (TypeError, ValueError):
        budget = math.nan
    if not (math.isfinite(budget) and budget >= 0):
        raise InvalidBudget(
            f"the cost budget must be a number >= 0 (price per 1k tokens), not {raw!r}"
        )
    return budget


def strip_gateway_fields(body: dict[str, Any]) -> bool:
    """Drop the gateway-only body fields before forwarding; True if the body changed.

    A string `priority` is ours (critical|high|normal|low): vLLM's own `priority`
    is an integer and rejects strings, so strings are removed and integers pass
    through untouched. `slo_deadline_ms` and `cost_budget` are always ours.
    """
    changed = False
    if isinstance(body.get(BODY_PRIORITY), str):
        del body[BODY_PRIORITY]
        changed = True
    if BODY_DEADLINE in body:
        del body[BODY_DEADLINE]
        changed = True
    if BODY_COST_BUDGET in body:
        del body[BODY_COST_BUDGET]
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
    deadline_ms: float | None = None  # the SLO, relative to `started` (stats)
    cost_budget: float | None = None  # a retry may only go to an engine within it
    scope: dict | None = None  # the ASGI scope (for the server's direct writer)
