"""What the benchmarks share (gwbench, kv_routing, pd_bench, multi_model, gateway_overhead):
timestamped progress lines, `sage llm` against a home, a free port, /metrics reading,
engines started at once and a gateway in front of them.

Imported as `harness` (the benchmarks run as scripts, so this folder is on sys.path).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
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


def start_engines(home: Path, plans: dict[str, list[str]], timeout: float = 450) -> dict:
    """`sage llm engine start ARGS --label LABEL --json` for every label at once (the manager
    queues what must not load together); {label: record} for those that came up, {label:
    error line} for those that did not. None is left starting on return, however it ends."""
    env = {**os.environ, "SAGELLM_HOME": str(home)}
    procs = {
        label: subprocess.Popen(
            [sys.executable, "-m", "sagellm_cli", "llm", "engine", "start", *argv,
             "--label", label, "--json"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for label, argv in plans.items()
    }  # fmt: skip
    out: dict[str, dict | str] = {}
    deadline = time.monotonic() + timeout
    try:
        for label, proc in procs.items():
            try:
                stdout, stderr = proc.communicate(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                out[label] = f"not up within {timeout:.0f}s"
                continue
            out[label] = json.loads(stdout) if proc.returncode == 0 else (
                f"rc {proc.returncode}: {stderr.strip()[-800:]}"
            )  # fmt: skip
    finally:  # a deadline or an error: no `engine start` goes on after the caller stops all
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
    return out


def all_up(started: dict) -> dict[str, dict]:
    """The records of `start_engines`, or RuntimeError naming the first engine that failed."""
    for label, value in started.items():
        if isinstance(value, str):
            raise RuntimeError(f"engine {label} failed to start: {value}")
    return started


@dataclass
class Gateway:
    """A running `sage llm serve` of a benchmark."""

    url: str  # http://127.0.0.1:PORT
    pid: int


@contextlib.contextmanager
def gateway(home: Path, *args: str, log_path: Path, port: int | None = None, ready="/ready"):
    """`sage llm serve ARGS` on a free port (or `port`), once `ready` answers 200 (/health
    when no engine runs yet). Stopped (its whole group) on exit."""
    port = port or free_port()
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sagellm_cli", "llm", "serve", "--port", str(port), *args],
            env={**os.environ, "SAGELLM_HOME": str(home)},
            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not _answers(base + ready):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the gateway did not start: see {log_path}")
                time.sleep(0.3)
            yield Gateway(base, proc.pid)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def wait_http(url: str, timeout: float) -> bool:
    """True once `url` answers 200, False after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not _answers(url):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True
