"""The seam for scheduling (admission control, queues, priorities).

The proxy calls `Scheduler.admit()` after the request is parsed and its model
group is known, and before an engine is chosen; `release()` runs when the
request ends, however it ends. The default is no scheduler at all (`None`), so
the hot path pays nothing. A scheduler may wait (queue), raise `Rejected`
(-> 429 or 503), or reorder; it sees the request's model group, parsed body and
`RouteInfo`, and may read per-engine `inflight` and `record.spec["max_inflight"]`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from sagellm_cli.gateway.registry import ModelGroup
    from sagellm_cli.gateway.routing import RouteInfo


class Rejected(Exception):
    """Raised by `admit` to refuse a request with an HTTP status and a message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class Scheduler(Protocol):
    """Admission control in front of engine selection."""

    async def admit(self, group: ModelGroup, body: dict[str, Any], info: RouteInfo) -> Any:
        """Wait until the request may proceed (or raise Rejected); return a ticket."""
        ...

    def release(self, ticket: Any) -> None:
        """The request admitted with `ticket` finished."""
        ...
