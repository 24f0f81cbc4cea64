"""Restart policies: what happens to an engine whose process died or stopped answering.

Pure decisions on a record, taken by `EngineManager` under the state lock. The loop that
acts on them (restarts when due, idle unload, wake on request) is the gateway's
supervisor (gateway/control/supervisor.py): without a running `sage llm serve` a crashed engine
is simply `failed`, as a container is without dockerd.
"""

from __future__ import annotations

from sagellm_cli.core.engines import logs
from sagellm_cli.core.launchers import process
from sagellm_cli.core.lifecycle import Status, transition
from sagellm_cli.core.records import EngineRecord, GatewayRecord
from sagellm_cli.core.state import State

# Restarts within this window count towards `max_restarts` (then: crash loop).
CRASH_WINDOW_S = 600.0
BACKOFF_MAX_S = 60.0
# Log lines quoted in a crash-loop error.
CRASH_LOG_LINES = 3


def gateway_alive(record: GatewayRecord | None) -> bool:
    """True if the recorded gateway process still runs (same pid and create time)."""
    return record is not None and process.is_alive(record.pid, record.create_time)


def supervised(state: State) -> bool:
    """True while a recorded `sage llm serve` runs (its supervisor applies the policies)."""
    return gateway_alive(state.gateway)


def unsupervised(state: State) -> list[str]:
    """Live engines whose restart policy or keep_alive waits for a gateway that isn't running."""
    if supervised(state):
        return []
    return [
        r.label or r.id
        for r in state.engines.values()
        if r.is_live and r.spec is not None and (r.spec.restart != "no" or r.spec.keep_alive >= 0)
    ]


def wants_restart(record: EngineRecord) -> bool:
    """docker's rule: `always` restarts whatever the exit code, `on-failure` unless it is 0."""
    policy = record.spec.restart if record.spec else "no"
    if policy == "always":
        return True
    return policy == "on-failure" and record.exit_code != 0


def backoff_s(recent_restarts: int) -> float:
    """1 s, 2 s, 4 s ... capped at 60 s, by the restarts already made within the window."""
    return min(BACKOFF_MAX_S, 2.0**recent_restarts)


def schedule_restart(record: EngineRecord, now: float, reason: str) -> bool:
    """After a crash (or a hang): set RESTARTING with its back-off and return True, or
    return False when the policy says no (or the transition table refuses it: a stopped
    engine is never restarted), or set FAILED with "crash loop" when the engine
    restarted `max_restarts` times within CRASH_WINDOW_S.
    """
    if not wants_restart(record):
        return False
    recent = [t for t in record.restart_times if now - t < CRASH_WINDOW_S]
    crash_loop = len(recent) >= record.spec.max_restarts
    if not transition(record, Status.FAILED if crash_loop else Status.RESTARTING, reason=reason):
        return False
    record.last_exit = record.exit_code
    record.restart_times = recent
    if crash_loop:
        note = logs.crash_note(record.log_path, CRASH_LOG_LINES)
        record.next_restart_at = None
        record.error = (
            f"crash loop: {len(recent)} restarts within {CRASH_WINDOW_S / 60:.0f} min "
            f"({reason}); {note}"
        )
        return True
    record.error = reason
    record.next_restart_at = now + backoff_s(len(recent))
    return True
