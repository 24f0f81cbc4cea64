"""What the GPU-machine benchmarks share (gwbench, kv_routing, pd_bench, multi_model):
timestamped progress lines, `sage llm` against a home, a free port, a /metrics sum.

Imported as `harness` (the benchmarks run as scripts, so this folder is on sys.path).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
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
