"""Helpers for the gateway tests (this module holds no tests).

`running_gateway` starts `sage llm serve` as a real subprocess and always kills
it; `inprocess_gateway` runs the Gateway app in the test's own event loop behind an
`httpx.ASGITransport` client, for tests whose point is the gateway's logic;
`fake_upstream` starts tests/fakes.py as a separate process (for a test that needs
its pid), `fakes.FakeUpstream` runs the same fake in a thread; either is used only
where a test isolates the gateway's own behaviour (fault injection);
`add_engine_record` registers such a fake in the state file the way the lifecycle
would (an in-process fake gives the test's own pid, which is alive).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Gateway:
    url: str
    port: int
    proc: subprocess.Popen
    log: Path
    home: Path

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    @property
    def admin(self) -> dict[str, str]:
        """The Authorization header of the admin token the gateway created in its home."""
        token = (self.home / "admin-token").read_text().strip()
        return {"Authorization": f"Bearer {token}"}

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode}:\n{log.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise AssertionError(f"{url} not up after {timeout}s:\n{log.read_text()}")


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@contextlib.contextmanager
def running_gateway(home: Path, *args: str, env: dict | None = None, timeout: float = 60):
    """`sage llm serve --port P ARGS` in the foreground, as a subprocess of the test."""
    port = free_port()
    log = home.parent / f"gateway-{port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "SAGELLM_HOME": str(home)}
    full_env.pop("SAGELLM_API_KEY", None)
    full_env.pop("SAGELLM_ADMIN_TOKEN", None)
    full_env.update(env or {})
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sagellm_cli", "llm", "serve", "--port", str(port), *args],
            env=full_env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=ROOT,
        )
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc, log, timeout)
        yield Gateway(f"http://127.0.0.1:{port}", port, proc, log, home)
    finally:
        _kill(proc)


@contextlib.asynccontextmanager
async def inprocess_gateway(state_path: Path, **config):
    """The Gateway app in this event loop; yields (gateway, httpx.AsyncClient).

    The admin token is "t" unless given (see ADMIN); the client talks to the app
    through `httpx.ASGITransport` at http://127.0.0.1 (the gateway refuses other hosts).
    """
    from sagellm_cli.core.state import StateStore
    from sagellm_cli.gateway.config import GatewayConfig
    from sagellm_cli.gateway.http.app import Gateway as App

    config.setdefault("admin_token", "t")
    cfg = GatewayConfig(**config)
    cfg.validate()
    gateway = App(cfg, StateStore(state_path))
    await gateway.startup()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=gateway), base_url="http://127.0.0.1", timeout=30
        ) as client:
            yield gateway, client
    finally:
        await gateway.shutdown()


ADMIN = {"Authorization": "Bearer t"}


@contextlib.contextmanager
def fake_upstream(*args: str, port: int | None = None):
    """tests/fakes.py as a process on a free port; yields (port, Popen)."""
    port = port or free_port()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"fake-upstream-{port}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "fakes.py"),
                "--port",
                str(port),
                *args,
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc, log, 30)
        yield port, proc
    finally:
        _kill(proc)


def add_engine_record(
    home: Path,
    engine_id: str,
    port: int,
    pid: int,
    *,
    name: str = "fake",
    kind: str = "llm",
    **fields,
):
    """Write (and return) an engine record for a process we started, as `engine start`
    would; `fields` set any other record field (label, role, status, pgid, ...)."""
    from sagellm_cli.core.records import EngineRecord
    from sagellm_cli.core.state import StateStore

    record = EngineRecord(
        **{
            "id": engine_id,
            "kind": kind,
            "runtime": "vllm" if kind == "llm" else "sentence-transformers",
            "model": f"/fake/{name}",
            "served_model_name": name,
            "host": "127.0.0.1",
            "port": port,
            "status": "ready",
            "pid": pid,
            "pid_create_time": psutil.Process(pid).create_time(),
            "created_at": time.time(),
            **fields,
        }
    )
    with StateStore(home / "state.json").transaction() as state:
        state.engines[engine_id] = record
    return record


def remove_engine_record(home: Path, engine_id: str) -> None:
    """Drop a record (as `engine prune` would)."""
    from sagellm_cli.core.state import StateStore

    with StateStore(home / "state.json").transaction() as state:
        state.engines.pop(engine_id, None)
