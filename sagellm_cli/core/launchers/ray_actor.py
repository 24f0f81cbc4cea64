"""The node side of Ray placement: what runs inside Ray workers on the cluster's nodes.

`EngineActor` is a detached, named actor (`sagellm-<engine id>` in the `sagellm`
namespace) that owns one engine's process group on its node, exactly as `LocalLauncher`
does on this machine: the same detached wrapper (core/launchers/process.py), the same exit-code
file, the same SIGTERM-then-SIGKILL stop. The engine's log is appended on the node.

The actor also starts a small watchdog beside the engine: if the actor's worker dies (its
node's raylet died, an OOM kill, `ray.kill`), the watchdog stops the engine's group, so an
engine never outlives the actor that accounts for it.

This module imports ray at the top: only launchers/ray.py and Ray's workers import it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

from sagellm_cli.core import paths
from sagellm_cli.core.errors import SageError
from sagellm_cli.core.launchers import ports, process

NAMESPACE = "sagellm"
ACTOR_PREFIX = "sagellm-"
# Threads of the actor: status calls must answer while a stop waits for the engine.
ACTOR_CONCURRENCY = 4
# How long `status` waits for the exit code of an engine that just died.
EXIT_FILE_WAIT_S = 1.0

# Polls the actor's and the engine's pids every second. When the actor is gone while the
# engine still runs, the engine's group gets SIGTERM, then SIGKILL 5 s later. The group id
# is valid while the engine (a member) lives, so the kill never reaches a recycled group.
_WATCHDOG = (
    'a="$1"; e="$2"; g="$3"; '
    'while kill -0 "$a" 2>/dev/null && kill -0 "$e" 2>/dev/null; do sleep 1; done; '
    'if kill -0 "$e" 2>/dev/null; then kill -TERM -"$g" 2>/dev/null; sleep 5; '
    'kill -KILL -"$g" 2>/dev/null; fi'
)
# Started through a shell that exits at once: the watchdog is then no child of the actor's
# worker, which Ray cleans up with the worker's direct children.
_DETACH = '"$@" </dev/null >/dev/null 2>&1 &'


def node_info() -> dict[str, Any]:
    """Where the calling task or actor runs: node id, node IP, the GPUs Ray gave it."""
    context = ray.get_runtime_context()
    return {
        "node_id": context.get_node_id(),
        "ip": ray.util.get_node_ip_address(),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
    }


def _error(exc: SageError) -> dict[str, Any]:
    return {"error": {"kind": type(exc).__name__, "message": exc.message, "hint": exc.hint}}


@ray.remote(num_cpus=0, max_retries=0)
def probe_port(taken: list[int], port: int | None = None) -> dict[str, Any]:
    """On the node Ray chose: its identity and a free port there (or a check of `port`)."""
    info = node_info()
    try:
        if port is None:
            info["port"] = ports.allocate_port(info["ip"], taken)
        else:
            ports.check_requested_port(info["ip"], port, taken)
            info["port"] = port
    except SageError as exc:
        info.update(_error(exc))
    return info


@ray.remote(num_cpus=0, max_retries=0)
def gpu_info() -> dict[str, Any]:
    """The node's NVML inventory (no GPUs on a CPU node: `nvml` false with a reason)."""
    from sagellm_cli.core.gpu import read_inventory

    info = node_info()
    try:
        info["inventory"] = read_inventory({}).to_dict()
    except Exception as exc:  # noqa: BLE001 - reported per node, never fatal for the listing
        info["inventory"] = {"nvml": False, "reason": f"{type(exc).__name__}: {exc}", "gpus": []}
    return info


class EngineActor:
    """Owns one engine's process group on this node (see the module docstring)."""

    def __init__(self, engine_id: str):
        self.engine_id = engine_id
        self.handle: process.ProcessHandle | None = None
        self.started_at: float | None = None
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"sagellm-{engine_id}-"))
        self.stopped_code: int | None = None

    def info(self) -> dict[str, Any]:
        """The node, the GPUs Ray assigned, and the engine's pid (None before `start`)."""
        return {
            **node_info(),
            "engine_id": self.engine_id,
            "actor_pid": os.getpid(),
            "pid": self.handle.pid if self.handle else None,
            "placement_group_id": ray.get_runtime_context().get_placement_group_id(),
        }

    def start(self, argv: list[str], env: dict[str, str], log_path: str) -> dict[str, Any]:
        """Start the engine in its own process group, its output appended to `log_path`."""
        if self.handle is not None:
            raise RuntimeError(f"engine {self.engine_id} was already started by this actor")
        env = dict(env)
        gpu_ids = ray.get_gpu_ids()
        if gpu_ids:  # the GPUs Ray assigned to this actor, in the node's own numbering
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpu_ids)
        if "TMPDIR" in env:  # the node's own private scratch folder
            env["TMPDIR"] = str(paths.ensure_private_dir(paths.scratch_dir(self.engine_id)))
        argv = list(argv)
        if argv and not os.path.exists(argv[0]):
            # The caller's interpreter path does not exist here: use this node's.
            argv[0] = sys.executable
        log = Path(log_path)
        paths.ensure_private_dir(log.parent)
        self.started_at = time.time()
        self.handle = process.spawn_group(argv, env, log, self.run_dir / "exit")
        self._watch(self.handle)
        return {
            **self.info(),
            "pgid": self.handle.pgid,
            "create_time": self.handle.create_time,
            "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES"),
        }

    def _watch(self, handle: process.ProcessHandle) -> None:
        argv = ["/bin/sh", "-c", _DETACH, "sagellm-detach", "/bin/sh", "-c", _WATCHDOG,
                "sagellm-watchdog", str(os.getpid()), str(handle.pid), str(handle.pgid)]  # fmt: skip
        subprocess.run(argv, stdin=subprocess.DEVNULL, start_new_session=True, check=False)

    def status(self) -> dict[str, Any]:
        """Is the engine's main process alive, and its exit code once it has exited."""
        handle = self.handle
        if handle is None:
            return {"alive": False, "pid": None, "exit_code": None}
        alive = process.is_alive(handle.pid, handle.create_time)
        code = self._exit_code()
        # The wrapper writes the code just after the engine exits: give it a moment, since
        # the caller may clean the run folder up as soon as it hears that the engine died.
        deadline = time.monotonic() + EXIT_FILE_WAIT_S
        while not alive and code is None and time.monotonic() < deadline:
            time.sleep(0.05)
            code = self._exit_code()
        return {"alive": alive, "pid": handle.pid, "exit_code": code}

    def leftovers(self) -> bool:
        """True while any process of the engine (helpers included) runs."""
        handle = self.handle
        if handle is None:
            return False
        own = handle.pid if process.is_alive(handle.pid, handle.create_time) else None
        return bool(process.engine_processes(own, handle.pgid, self.started_at))

    def stop(self, timeout: float, host: str, port: int) -> dict[str, Any]:
        """SIGTERM the group, SIGKILL after `timeout`; wait (5 s at most) for the port."""
        handle = self.handle
        killed = 0
        if handle is not None:
            own = handle.pid if process.is_alive(handle.pid, handle.create_time) else None
            killed = process.terminate_group(own, handle.pgid, self.started_at, timeout)
        deadline = time.monotonic() + 5.0
        while not ports.is_port_free(host, port) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.stopped_code = self._exit_code()
        return {"killed": killed, "exit_code": self.stopped_code}

    def cleanup(self) -> None:
        """Remove the engine's scratch folders and this actor's run files on the node."""
        for scratch in paths.scratch_dirs(self.engine_id):
            shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def _exit_code(self) -> int | None:
        code = process.read_exit_code(self.run_dir / "exit")
        return code if code is not None else self.stopped_code


RemoteEngineActor = ray.remote(max_concurrency=ACTOR_CONCURRENCY, max_restarts=0)(EngineActor)
