"""Where engines run: this machine (`LocalLauncher`) or a Ray cluster's node (RayLauncher).

`EngineManager` and the gateway's health checks go through a `Launcher` for everything
that depends on where the engine runs: ports, scratch space, spawning, liveness,
stopping, exit codes and clean-up. Only `LocalLauncher` knows that an engine is a
process group on this machine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from sagellm_cli.core import paths
from sagellm_cli.core.errors import ResourceUnavailable
from sagellm_cli.core.launchers import process
from sagellm_cli.core.launchers.process import ProcessHandle
from sagellm_cli.core.records import EngineRecord, EngineSpec

if TYPE_CHECKING:
    from sagellm_cli.core.gpu import Placement
    from sagellm_cli.core.state import State

LOCAL = "local"


class Launcher(Protocol):
    """Starts, checks and stops engine processes on some node."""

    node: str
    # True when every call is a local look (/proc, this machine's files): no network, so
    # it may run on an event loop, and paths it is given are this machine's.
    on_this_machine: bool

    def allocate_port(self, host: str, taken: Iterable[int]) -> int:
        """A free port on the node that no record holds."""
        ...

    def check_port(self, host: str, port: int, taken: Iterable[int]) -> None:
        """Raise ResourceUnavailable (exit 4) if a requested port is recorded or bound."""
        ...

    def engine_host(self, spec: EngineSpec) -> str:
        """The address the engine binds and `record.url` routes to (after the port call)."""
        ...

    def place(
        self, spec: EngineSpec, runtime: str, state: State, live: list[EngineRecord]
    ) -> tuple[Placement | None, list[int]]:
        """GPUs (a placement whose reservation goes into the ledger, or None for CPU) and
        the CPU cores the engine may use; called under the state lock."""
        ...

    def scratch_dir(self, engine_id: str) -> Path:
        """The engine's private TMPDIR on the node (created)."""
        ...

    def spawn(
        self, engine_id: str, argv: list[str], env: dict[str, str], log_path: Path
    ) -> ProcessHandle:
        """Start the engine detached from the caller and return its handle, whose
        `instance` names this run of the engine (a restart gets another)."""
        ...

    def is_alive(self, record: EngineRecord) -> bool:
        """True while the engine's main process runs."""
        ...

    def has_leftovers(self, record: EngineRecord) -> bool:
        """True if any process of the engine (its helpers included) still runs."""
        ...

    def terminate(self, record: EngineRecord, timeout: float) -> int:
        """Stop every process of the engine; return how many needed SIGKILL."""
        ...

    def exit_code(self, record: EngineRecord) -> int | None:
        """The engine's exit code once it has exited (128+N for signal N), else None."""
        ...

    def wait_port_free(self, record: EngineRecord, timeout: float = 5.0) -> None:
        """Return once the stopped engine's port is free (ResourceUnavailable if not)."""
        ...

    def cleanup(self, record: EngineRecord, *, forget: bool = False) -> None:
        """Remove the engine's scratch space; with `forget`, also its run files."""
        ...


class LocalLauncher:
    """Runs engines as detached process groups on this machine."""

    node = LOCAL
    on_this_machine = True

    def allocate_port(self, host: str, taken: Iterable[int]) -> int:
        """A port the OS reports free and no record holds."""
        from sagellm_cli.core.launchers import (
            ports,  # spawn path only: keeps `engine list` start-up small
        )

        return ports.allocate_port(host, taken)

    def check_port(self, host: str, port: int, taken: Iterable[int]) -> None:
        """Exit 4 if the port is recorded or bound."""
        from sagellm_cli.core.launchers import ports

        ports.check_requested_port(host, port, taken)

    def engine_host(self, spec: EngineSpec) -> str:
        """What the user asked for: `--host`."""
        return spec.host

    def place(
        self, spec: EngineSpec, runtime: str, state: State, live: list[EngineRecord]
    ) -> tuple[Placement | None, list[int]]:
        """NVML and the ledger choose GPUs; CPU engines get their own share of the cores."""
        from sagellm_cli.core.gpu import plan_gpu
        from sagellm_cli.core.launchers.cpu_placement import pick_cores

        placement = plan_gpu(spec, state)
        cores: list[int] = []
        if (placement is None or placement.mock) and _binds_cpu_threads(spec, runtime):
            cores = pick_cores(r.cpu_cores for r in live)
        return placement, cores

    def scratch_dir(self, engine_id: str) -> Path:
        """A private folder under the system temp dir (or the state dir), short for sockets."""
        return paths.ensure_private_dir(paths.scratch_dir(engine_id))

    def spawn(
        self, engine_id: str, argv: list[str], env: dict[str, str], log_path: Path
    ) -> ProcessHandle:
        """Start `argv` in its own session with output appended to `log_path`; its instance
        is `pid@host`."""
        import dataclasses
        import socket

        exit_file = _exit_file(engine_id)
        paths.ensure_private_dir(exit_file.parent)
        handle = process.spawn_group(argv, env, log_path, exit_file)
        return dataclasses.replace(handle, instance=f"{handle.pid}@{socket.gethostname()}")

    def is_alive(self, record: EngineRecord) -> bool:
        """Main pid alive and not reused."""
        return process.is_alive(record.pid, record.pid_create_time)

    def has_leftovers(self, record: EngineRecord) -> bool:
        """Any process left in the engine's group or tree."""
        return bool(process.engine_processes(_own_pid(record), record.pgid, record.started_at))

    def terminate(self, record: EngineRecord, timeout: float) -> int:
        """SIGTERM the group, then SIGKILL after `timeout`."""
        return process.terminate_group(_own_pid(record), record.pgid, record.started_at, timeout)

    def exit_code(self, record: EngineRecord) -> int | None:
        """What the engine's wrapper shell wrote when the engine exited."""
        return process.read_exit_code(_exit_file(record.id))

    def wait_port_free(self, record: EngineRecord, timeout: float = 5.0) -> None:
        """Poll a bind of the port until it succeeds."""
        import time

        from sagellm_cli.core.launchers import ports

        deadline = time.monotonic() + timeout
        while not ports.is_port_free(record.host, record.port):
            if time.monotonic() > deadline:
                raise ResourceUnavailable(
                    f"port {record.port} is still bound after the engine stopped",
                    hint="another process may hold it; check with `ss -ltnp`",
                )
            time.sleep(0.1)

    def cleanup(self, record: EngineRecord, *, forget: bool = False) -> None:
        """vLLM leaves dist-init files and inductor folders in its TMPDIR on every start."""
        import shutil

        # Only verified private roots are cleaned: a root that is a symlink could point anywhere.
        for scratch in paths.scratch_dirs(record.id):
            shutil.rmtree(scratch, ignore_errors=True)
        if forget:
            shutil.rmtree(paths.run_dir() / record.id, ignore_errors=True)


def _binds_cpu_threads(spec: EngineSpec, runtime: str) -> bool:
    # vLLM's bind list takes one core set per rank; the user's own binding wins.
    return (
        runtime == "vllm"
        and spec.tensor_parallel * spec.pipeline_parallel == 1
        and "VLLM_CPU_OMP_THREADS_BIND" not in spec.env
    )


def _exit_file(engine_id: str) -> Path:
    return paths.run_dir() / engine_id / "exit"


def _own_pid(record: EngineRecord) -> int | None:
    # A reused pid belongs to someone else: never walk or signal its tree.
    return record.pid if process.is_alive(record.pid, record.pid_create_time) else None


def node_kind(node: str) -> str:
    """The kind of a record's `node`: `local`, or the prefix of `ray:<id>` or `external:<host>`."""
    return node.partition(":")[0]


def _ray(node: str | None, spec: EngineSpec | None) -> Launcher:
    from sagellm_cli.core.launchers.ray import RayLauncher  # ray itself: only when used

    return RayLauncher(node, spec=spec)


def _external(node: str | None, spec: EngineSpec | None) -> Launcher:
    from sagellm_cli.core.launchers.external import ExternalLauncher

    return ExternalLauncher(node)


def _local(node: str | None, spec: EngineSpec | None) -> Launcher:
    return _LOCAL


# Node kind -> the factory of its launcher (a launcher module is imported on first use).
_KINDS: dict[str, Callable[[str | None, EngineSpec | None], Launcher]] = {
    LOCAL: _local,
    "ray": _ray,
    "external": _external,
}
_LOCAL = LocalLauncher()
_LAUNCHERS: dict[str, Launcher] = {LOCAL: _LOCAL}


def launcher_for_spec(spec: EngineSpec) -> Launcher:
    """Where a new engine runs: a Ray cluster's node when one is named, else this machine."""
    from sagellm_cli.core.launchers.ray import cluster_address  # no ray import: an env lookup

    kind = "ray" if cluster_address(spec) else LOCAL
    # A new launcher per Ray engine: its first port call chooses the node.
    return _KINDS[kind](None, spec)


def launcher_for(node: str) -> Launcher:
    """The launcher of a record's node (one per node, made on first use)."""
    launcher = _LAUNCHERS.get(node)
    if launcher is None:
        factory = _KINDS.get(node_kind(node))
        if factory is None:
            raise NotImplementedError(f"no launcher for node {node!r}")
        launcher = _LAUNCHERS.setdefault(node, factory(node, None))
    return launcher
