"""The gateway's record in the state file, `--background`, `--status` and `--stop`.

A running gateway (foreground or background) writes `state.gateway` once it
listens and clears it on a clean exit. A record whose process is gone (checked
by pid and create time, like engines) is reconciled away.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from sagellm_cli.core import paths
from sagellm_cli.core.credentials import ADMIN_TOKEN_ENV, API_KEY_ENV
from sagellm_cli.core.engines import logs
from sagellm_cli.core.engines.supervision import gateway_alive
from sagellm_cli.core.errors import BadInput, OperationFailed, ResourceUnavailable
from sagellm_cli.core.launchers import process
from sagellm_cli.core.records import GatewayRecord
from sagellm_cli.core.state import StateStore
from sagellm_cli.gateway.config import GatewayConfig

SECRET_FIELDS = ("api_key", "admin_token")


def log_path():
    """Where a background gateway writes its output."""
    return paths.logs_dir() / "gateway.log"


def current(store: StateStore | None = None) -> GatewayRecord | None:
    """The live gateway record, reconciling a dead one away."""
    store = store or StateStore()
    record = store.read().gateway
    if record is None or gateway_alive(record):
        return record
    with store.transaction() as state:
        if state.gateway and not gateway_alive(state.gateway):
            state.gateway = None
    return None


def ensure_not_running(store: StateStore | None = None) -> None:
    """Exit 4 if a gateway already runs for this state directory."""
    record = current(store)
    if record is not None:
        raise ResourceUnavailable(
            f"a gateway already runs at {record.url} (pid {record.pid})",
            hint="stop it with `sage llm serve --stop`",
        )


def record_self(config: GatewayConfig, store: StateStore | None = None) -> bool:
    """Write this process as the gateway (called once the socket listens).

    A second foreground gateway (another port, e.g. for an experiment) runs
    unrecorded rather than hiding the first; returns False then.
    """
    store = store or StateStore()
    me = psutil.Process()
    pgid = os.getpgid(0)
    with store.transaction() as state:
        if state.gateway and state.gateway.pid != me.pid and gateway_alive(state.gateway):
            return False
        background = os.environ.get("SAGELLM_GATEWAY_BACKGROUND") == "1"
        state.gateway = GatewayRecord(
            pid=me.pid,
            pgid=pgid if pgid == me.pid else None,
            create_time=me.create_time(),
            host=config.host,
            port=config.port,
            url=config.url,
            routing=config.routing,
            auth=bool(config.api_key),
            started_at=time.time(),
            background=background,
            log_path=str(log_path()) if background else None,
        )
    return True


def clear_self(store: StateStore | None = None) -> None:
    """Remove the gateway record if it is this process's."""
    store = store or StateStore()
    with contextlib.suppress(Exception), store.transaction() as state:
        if state.gateway and state.gateway.pid == os.getpid():
            state.gateway = None


def config_path():
    """Where `--background` hands the gateway its options (secrets travel in the env)."""
    return paths.run_dir() / "gateway-config.json"


def write_config(config: GatewayConfig) -> Path:
    """The config as JSON, without secrets, mode 0600: the background child's only input."""
    data = dataclasses.asdict(config)
    for secret in SECRET_FIELDS:
        data.pop(secret, None)
    path = config_path()
    paths.ensure_private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    return path


def read_config(path: str | Path) -> GatewayConfig:
    """The config a parent wrote, with the secrets taken from the environment."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    data["api_key"] = os.environ.get(API_KEY_ENV) or None
    data["admin_token"] = os.environ.get(ADMIN_TOKEN_ENV) or None
    config = GatewayConfig(**data)
    config.validate()  # a new process: its one validation
    return config


def run(config: GatewayConfig, announce: Callable[[bool], None] | None = None) -> None:
    """Serve in this process until SIGINT/SIGTERM, recorded in the state file meanwhile.

    `announce(recorded)` runs once the socket listens.
    """
    from sagellm_cli.gateway.http import server

    def started() -> None:
        recorded = record_self(config)
        if announce is not None:
            announce(recorded)

    server.serve(config, on_started=started, on_stopped=clear_self)


def _health_ok(url: str) -> bool:
    from sagellm_cli.core.engines import probe

    return probe.health_ok(url)


def start_background(config: GatewayConfig, timeout: float = 60.0) -> GatewayRecord:
    """Spawn a detached gateway (for a validated config) and wait until it answers /health."""
    store = StateStore()
    ensure_not_running(store)
    from sagellm_cli.gateway.http.server import bind_socket

    bind_socket(config.host, config.port).close()  # exit 4 now, not in the child's log
    config_file = write_config(config)
    env = {**os.environ, "SAGELLM_GATEWAY_BACKGROUND": "1", "PYTHONUNBUFFERED": "1"}
    for key, value in ((API_KEY_ENV, config.api_key), (ADMIN_TOKEN_ENV, config.admin_token)):
        if value:
            env[key] = value
        else:
            env.pop(key, None)
    path = log_path()
    paths.ensure_private_dir(path.parent)
    with open(path, "ab", buffering=0) as log:
        log.write(f"\n[sagellm] {time.strftime('%Y-%m-%d %H:%M:%S')} starting gateway\n".encode())
        child = subprocess.Popen(
            [sys.executable, "-m", "sagellm_cli.gateway.daemon", str(config_file)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    deadline = time.monotonic() + timeout
    while True:
        code = child.poll()
        if code is not None:
            tail = "\n".join(logs.tail_lines(path, 15))
            error = {2: BadInput, 4: ResourceUnavailable}.get(code, OperationFailed)
            raise error(
                f"the gateway exited during start-up with code {code}",
                hint=f"see {path}",
                details=tail,
            )
        record = store.read().gateway
        if record and record.pid == child.pid and _health_ok(config.url):
            return record
        if time.monotonic() > deadline:
            _terminate(child.pid, child.pid, None, 5.0)
            raise OperationFailed(
                f"the gateway did not answer /health within {timeout:.0f}s and was stopped",
                hint=f"see {path}",
                details="\n".join(logs.tail_lines(path, 15)),
            )
        time.sleep(0.1)


def _terminate(pid: int, pgid: int | None, create_time: float | None, timeout: float) -> None:
    # The same group-and-tree stop as engines; a foreground gateway (pgid None) shares
    # its shell's group, so then only its own tree is signalled.
    if process.is_alive(pid, create_time):
        process.terminate_group(pid, pgid, create_time, timeout)


def stop(timeout: float = 10.0) -> GatewayRecord | None:
    """Stop the recorded gateway; a no-op (returning None) when none runs."""
    store = StateStore()
    record = current(store)
    if record is None:
        return None
    _terminate(record.pid, record.pgid, record.create_time, timeout)
    with store.transaction() as state:
        if state.gateway and state.gateway.pid == record.pid:
            state.gateway = None
    return record


def status() -> dict[str, Any]:
    """`{running, healthy, ...record}` for `sage llm serve --status`."""
    record = current()
    if record is None:
        return {"running": False}
    return {"running": True, "healthy": _health_ok(record.url), **record.to_dict()}


def _main(argv: list[str]) -> int:
    """The background gateway: `python -m sagellm_cli.gateway.daemon CONFIG_JSON`."""
    from sagellm_cli.core.errors import SageError

    try:
        run(read_config(argv[0]))
    except SageError as exc:
        sys.stderr.write(f"error: {exc.one_line()}\n")
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
