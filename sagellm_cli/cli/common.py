"""Output helpers shared by all commands: JSON on stdout, messages on stderr."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from sagellm_cli.core.lifecycle import Status

# One colour per engine status, for every table that shows one (engine list, top, presets).
STATUS_COLORS: dict[Status, str] = {
    Status.QUEUED: "cyan",
    Status.STARTING: "yellow",
    Status.READY: "green",
    Status.UNHEALTHY: "red",
    Status.SLEEPING: "blue",
    Status.WAKING: "yellow",
    Status.UNLOADING: "dim",
    Status.IDLE: "dim",
    Status.RESTARTING: "yellow",
    Status.STOPPING: "yellow",
    Status.STOPPED: "dim",
    Status.FAILED: "red",
}


def status_color(status: str) -> str:
    """The colour an engine status is shown in (plain strings from JSON documents too)."""
    return STATUS_COLORS.get(status, "dim")


def emit_json(data: Any) -> None:
    """Write `data` as JSON on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def info(message: str) -> None:
    """A human message on stderr."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def stdout_console():
    """A rich console on stdout (imported lazily: rich costs start-up time).

    Piped output gets a wide console so that rows are never wrapped or cut for `grep`/`awk`.
    """
    import os

    from rich.console import Console

    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 240
    return Console(highlight=False, width=width)


def stderr_console():
    """A rich console on stderr, for progress and messages."""
    from rich.console import Console

    return Console(stderr=True, highlight=False)


class PlainProgress:
    """Progress for logs and pipes, where a spinner shows nothing: one stderr line per
    subject at most every `interval` seconds, and at once when its status changes."""

    def __init__(self, interval: float = 10.0):
        self.interval = interval
        self.last: dict[str, tuple[str, float]] = {}

    def report(self, subject: str, status: str, elapsed: float, line: str = "") -> None:
        """Print `[  12s] subject status: last log line` if it is due."""
        previous = self.last.get(subject)
        now = time.monotonic()
        if previous and previous[0] == status and now - previous[1] < self.interval:
            return
        self.last[subject] = (status, now)
        info(f"[{elapsed:5.0f}s] {subject} {status}" + (f": {line}" if line else ""))


def stderr_is_terminal() -> bool:
    """True when progress can be drawn in place (spinners, live tables)."""
    return sys.stderr.isatty()


def check_timeout(seconds: float, option: str = "--timeout") -> float:
    """Return `seconds` if it is a finite number >= 0; else exit 2 naming `option`."""
    from sagellm_cli.core.inputs.checks import check_seconds  # shared with the library

    return check_seconds(seconds, option)


def human_duration(seconds: float | None) -> str:
    """`3h12m`, `4m05s`, `12s`."""
    if seconds is None:
        return "-"
    seconds = int(max(seconds, 0))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def uptime(started_at: float | None, live: bool) -> str:
    """Uptime of a live engine, `-` otherwise."""
    return human_duration(time.time() - started_at) if (live and started_at) else "-"
