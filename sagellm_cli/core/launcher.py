"""Where engines run. One interface, so that a Ray launcher can join the local one."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from sagellm_cli.core import process
from sagellm_cli.core.models import EngineRecord
from sagellm_cli.core.process import ProcessHandle


class Launcher(Protocol):
    """Starts, checks and stops engine processes on some node."""

    node: str

    def spawn(
        self, argv: list[str], env: dict[str, str], log_path: Path, exit_file: Path
    ) -> ProcessHandle:
        """Start the engine and return its identity."""
        ...

    def is_alive(self, record: EngineRecord) -> bool:
        """True while the engine's main process runs."""
        ...

    def has_leftovers(self, record: EngineRecord) -> bool:
        """True if any process of the engine's group or tree still runs."""
        ...

    def terminate(self, record: EngineRecord, timeout: float) -> int:
        """Stop every process of the engine; return how many needed SIGKILL."""
        ...


class LocalLauncher:
    """Runs engines as process groups on this machine."""

    node = "local"

    def spawn(
        self, argv: list[str], env: dict[str, str], log_path: Path, exit_file: Path
    ) -> ProcessHandle:
        """Start `argv` in its own session with output appended to `log_path`."""
        return process.spawn_group(argv, env, log_path, exit_file)

    def is_alive(self, record: EngineRecord) -> bool:
        """Main pid alive and not reused."""
        return process.is_alive(record.pid, record.pid_create_time)

    def has_leftovers(self, record: EngineRecord) -> bool:
        """Any process left in the engine's group or tree."""
        return bool(process.engine_processes(_own_pid(record), record.pgid, record.started_at))

    def terminate(self, record: EngineRecord, timeout: float) -> int:
        """SIGTERM the group, then SIGKILL after `timeout`."""
        return process.terminate_group(_own_pid(record), record.pgid, record.started_at, timeout)


def _own_pid(record: EngineRecord) -> int | None:
    # A reused pid belongs to someone else: never walk or signal its tree.
    return record.pid if process.is_alive(record.pid, record.pid_create_time) else None


def launcher_for(node: str) -> Launcher:
    """The launcher of a node; only `local` exists so far."""
    if node != "local":
        raise NotImplementedError(f"no launcher for node {node!r}")
    return LocalLauncher()
