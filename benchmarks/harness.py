"""What the benchmarks share (gwbench, kv_routing, pd_bench, multi_model, gateway_overhead):
timestamped progress lines, `sage llm` against a home, a free port, /metrics reading.

Imported as `harness` (the benchmarks run as scripts, so this folder is on sys.path).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# When the benchmark started (its progress lines and time budgets count from here).
T0 = time.monotonic()


def log(msg: str) -> None:
    """A progress line stamped with the seconds since T0."""
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def sage(home: Path, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    """`sage llm ARGS` against `home` (output captured, never raises on its exit code)."""
    env = {**os.environ, "SAGELLM_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "sagellm_cli", "llm", *args],
        env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def free_port() -> int:
    """A port free right now on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def metric(text: str, name: str, label: str = "") -> float:
    """The sum of the Prometheus samples of `name` whose label text contains `label`."""
    total = 0.0
    for line in text.splitlines():
        if (
            line.startswith(name)
            and line[len(name) : len(name) + 1] in ("{", " ")
            and label in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def scrape(url: str) -> str:
    """A /metrics text, or "" when it can't be read."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.read().decode()
    except OSError:
        return ""


_LAG = "sagellm_gateway_event_loop_lag_seconds"


def loop_lag(before: str, after: str) -> dict:
    """The gateway's event-loop lag between two /metrics scrapes: the mean, in ms, and the
    share of probes that came 10 ms or more late ({} if the gateway has no probe)."""
    count = metric(after, f"{_LAG}_count") - metric(before, f"{_LAG}_count")
    if count <= 0:
        return {}
    total = metric(after, f"{_LAG}_sum") - metric(before, f"{_LAG}_sum")
    bucket = f"{_LAG}_bucket"
    on_time = metric(after, bucket, 'le="0.01"') - metric(before, bucket, 'le="0.01"')
    return {"lag_mean_ms": 1000 * total / count, "lag_over_10ms": 1 - on_time / count}
