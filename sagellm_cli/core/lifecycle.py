"""The engine state machine: one status type and one transition table (docs/lifecycle.md).

Every status an engine record can have is a `Status`; every change of it goes through
`transition()`, which the state writers (`EngineManager` and the restart policy in
core/engines/supervision.py, always under the state lock) call. A change the table does not
allow is refused: logged, and nothing is written. So a late answer (a `/sleep` that
returns after `engine stop`) can never turn a stopped engine back into a live one.

Other modules read `Status` members and the sets below, never string literals.
"""

from __future__ import annotations

import enum
import logging
from typing import Protocol

log = logging.getLogger("sagellm.lifecycle")


class Tracked(Protocol):
    """What the table changes: a record with an id and a status (an EngineRecord; named
    structurally so that records.py, which uses the statuses, is not imported back)."""

    id: str
    status: Status


class Status(str, enum.Enum):
    """An engine's status. A `str`, so the state file keeps the same strings (and old
    files load) and JSON output is unchanged."""

    QUEUED = "queued"  # waiting for another engine on its GPU to finish loading
    STARTING = "starting"  # the process runs, not ready yet
    READY = "ready"  # serving
    UNHEALTHY = "unhealthy"  # /health or generation probes fail; the process runs
    SLEEPING = "sleeping"  # vLLM sleep mode: process and port kept, most GPU memory freed
    WAKING = "waking"  # /wake_up sent, its full reservation taken back
    UNLOADING = "unloading"  # its processes are being stopped after keep_alive
    IDLE = "idle"  # unloaded: no process, nothing reserved; a request loads it
    RESTARTING = "restarting"  # crashed or hung: a restart is due (reservation kept)
    STOPPING = "stopping"  # `engine stop`: its processes are being stopped
    STOPPED = "stopped"
    FAILED = "failed"

    def __str__(self) -> str:  # f-strings and %s show "ready", not "Status.READY"
        return self.value

    # str's hash, so that a plain string finds a member in a set or dict key.
    __hash__ = str.__hash__


S = Status
# Allowed changes: status -> the statuses it may become. Setting the status it already
# has is always allowed (a no-op). A record created afresh (also when restarted under the
# same id) starts QUEUED, STARTING, IDLE or (external) READY; a restart under the same id
# is checked as a change from the old record's status.
TRANSITIONS: dict[Status, frozenset[Status]] = {
    S.QUEUED: frozenset({S.STARTING, S.STOPPING, S.STOPPED, S.FAILED, S.RESTARTING}),
    S.STARTING: frozenset({S.READY, S.STOPPING, S.FAILED, S.RESTARTING}),
    S.READY: frozenset({S.UNHEALTHY, S.SLEEPING, S.UNLOADING, S.STOPPING, S.FAILED, S.RESTARTING}),
    S.UNHEALTHY: frozenset({S.READY, S.UNLOADING, S.STOPPING, S.FAILED, S.RESTARTING}),
    S.SLEEPING: frozenset({S.WAKING, S.STOPPING, S.FAILED, S.RESTARTING}),
    # A failed /wake_up goes back to SLEEPING (its full reservation kept: vLLM may be
    # half awake); a gateway that died mid-wake leaves WAKING, which wakes like SLEEPING.
    S.WAKING: frozenset({S.READY, S.SLEEPING, S.STOPPING, S.FAILED, S.RESTARTING}),
    S.UNLOADING: frozenset({S.IDLE, S.STOPPING}),
    S.IDLE: frozenset({S.QUEUED, S.STARTING, S.STOPPING}),
    S.RESTARTING: frozenset({S.QUEUED, S.STARTING, S.STOPPING, S.FAILED}),
    S.STOPPING: frozenset({S.STOPPED, S.FAILED}),
    S.STOPPED: frozenset({S.QUEUED, S.STARTING}),  # `engine restart`, a preset re-apply
    S.FAILED: frozenset({S.QUEUED, S.STARTING}),
}
# How a record may begin (creation is not a change of an existing status).
INITIAL: frozenset[Status] = frozenset({S.QUEUED, S.STARTING, S.IDLE, S.READY})

# "Live": meant to serve, loaded or not. It keeps its label, is listed, and is woken or
# stopped like any other. Only STOPPED and FAILED are not.
LIVE: frozenset[Status] = frozenset(TRANSITIONS) - {S.STOPPED, S.FAILED}
# Live statuses without a process of ours to check for liveness.
NO_PROCESS: frozenset[Status] = frozenset({S.RESTARTING, S.IDLE})
# What a process that exits in the first status becomes (nothing went wrong).
EXPECTED_EXIT: dict[Status, Status] = {S.STOPPING: S.STOPPED, S.UNLOADING: S.IDLE}
# What the gateway routes to, and what health checks may put (back) in rotation.
SERVING = S.READY
CHECKABLE: frozenset[Status] = frozenset({S.STARTING, S.READY, S.UNHEALTHY})
# What `/health` probes of `engine list` and refresh() judge (they may flip ready/unhealthy).
PROBED: frozenset[Status] = frozenset({S.READY, S.UNHEALTHY})
# What a request may load: unloaded, being unloaded, asleep or (left) waking.
WAKEABLE: frozenset[Status] = frozenset({S.UNLOADING, S.IDLE, S.SLEEPING, S.WAKING})
# Being loaded from scratch (serial starts per GPU look at these).
LOADING: frozenset[Status] = frozenset({S.QUEUED, S.STARTING})
del S


class IllegalTransition(Exception):
    """A change the table refuses (raised by `require`, never escapes a state writer)."""


def allowed(current: Status | str, new: Status | str) -> bool:
    """True if an engine in `current` may become `new` (the same status always may)."""
    current, new = Status(current), Status(new)
    return current == new or new in TRANSITIONS[current]


def transition(record: Tracked, new: Status, *, reason: str | None = None) -> bool:
    """Set `record.status` to `new` if the table allows it and return True; otherwise log
    the refusal, leave the record untouched and return False.

    Callers change the record's other fields only when this returns True.
    """
    current = Status(record.status)
    if not allowed(current, new):
        log.warning(
            "engine %s: refused %s -> %s%s",
            record.id,
            current,
            new,
            f" ({reason})" if reason else "",
        )
        return False
    record.status = Status(new)
    return True


def require(record: Tracked, new: Status, *, reason: str | None = None) -> None:
    """`transition()`, raising IllegalTransition when it is refused (for a writer that
    must abandon a whole transaction then)."""
    if not transition(record, new, reason=reason):
        raise IllegalTransition(f"engine {record.id}: {record.status} -> {new} is not allowed")
