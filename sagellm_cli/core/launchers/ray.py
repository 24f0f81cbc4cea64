"""Ray placement: engines on the nodes of an existing Ray cluster (docs/cluster.md).

`RayLauncher` implements the `Launcher` protocol (core/launchers/base.py) with Ray's own
scheduling: Ray chooses the node (its CPU and GPU resources are the ledger), a tiny task
on that node finds a free port there, and at spawn a detached named actor
(`ray_actor.EngineActor`, `sagellm-<engine id>` in the `sagellm` namespace) starts the
engine's process group on the node and answers for it: pid, liveness, exit code, stop.

- CPU engines: the actor holds `num_cpus=1` on the chosen node (hard node affinity).
- GPU engines: a detached placement group of one bundle `{CPU: 1, GPU: TP x PP}` on the
  chosen node (one bundle: one node), named `sagellm-<node>-<port>`; the actor runs in it
  and the engine gets the `CUDA_VISIBLE_DEVICES` Ray assigned to the bundle.
- Liveness is Ray's: an actor on a node that died is dead (ActorDiedError), so the engine
  is found dead by the same reconcile as a local one.

Records carry `node` = `ray:<first 16 hex digits of the Ray node id>` and `host` = the
node's IP, so `record.url` routes from anywhere in the cluster's network.

ray is imported only inside functions: `sage llm` never imports it unless a cluster is
used (`--cluster`, `SAGELLM_RAY_ADDRESS`, `cluster:` in a preset, or a record on a node).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sagellm_cli.core.errors import BadInput, OperationFailed, ResourceUnavailable, SageError
from sagellm_cli.core.gpu.plan import Placement
from sagellm_cli.core.launchers.process import ProcessHandle
from sagellm_cli.core.records import EngineRecord, EngineSpec, GpuReservation

if TYPE_CHECKING:
    from sagellm_cli.core.state import State

NODE_PREFIX = "ray:"
# A Ray cluster for every new engine that names none (docs/cluster.md).
RAY_ADDRESS_ENV = "SAGELLM_RAY_ADDRESS"
NODE_ID_CHARS = 16
NAMESPACE = "sagellm"
ACTOR_PREFIX = "sagellm-"
# How a GPU placement tells `spawn` which placement group the actor belongs in.
PG_ENV = "SAGELLM_RAY_PG"
# Seconds: a port probe (it waits for a node with room), a placement group, an actor's
# start (a worker process on the node), one call to an actor, and the TCP check before
# ray.init (which otherwise retries an unreachable address for minutes).
PROBE_TIMEOUT_S = 30.0
PG_TIMEOUT_S = 30.0
ACTOR_START_TIMEOUT_S = 120.0
CALL_TIMEOUT_S = 10.0
# Liveness is asked from the gateway's event loop (health checks): keep a hung node short.
ALIVE_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 3.0
# Ray lets a killed actor's name go a moment after ray.kill.
NAME_RETRY_S = 15.0
# vLLM's own default share of a whole GPU, used when the node's NVML can't tell its size.
DEFAULT_GPU_UTILIZATION = 0.9

_lock = threading.RLock()
_connected: dict[str, str] = {}
_warned: set[str] = set()
# Exit codes read by `terminate` before it kills the actor: engine id -> (pid, code).
_exit_codes: dict[str, tuple[int | None, int | None]] = {}


# --------------------------------------------------------------------------- connection


def cluster_address(spec: EngineSpec | None) -> str | None:
    """The Ray cluster a new engine goes to: its `cluster`, else SAGELLM_RAY_ADDRESS."""
    return (spec.cluster if spec is not None else None) or os.environ.get(RAY_ADDRESS_ENV) or None


def _host_port(address: str) -> tuple[str, int] | None:
    text = address.split("://", 1)[-1].rstrip("/")
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _check_reachable(address: str) -> None:
    import socket

    target = _host_port(address)
    if target is None:
        if address.strip() == "auto":
            return
        raise BadInput(
            f"bad Ray cluster address {address!r}",
            hint="use ray://HOST:PORT (Ray Client) or HOST:PORT (the head's GCS port)",
        )
    try:
        socket.create_connection(target, timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ResourceUnavailable(
            f"the Ray cluster at {address} does not answer: {exc.strerror or exc}",
            hint="start it (`ray start --head`) or fix --cluster / SAGELLM_RAY_ADDRESS",
        ) from None


def _import_ray():
    try:
        import ray
    except ImportError:
        raise BadInput(
            "engines on a Ray cluster need Ray, which is not installed",
            hint="pip install 'sagellm-cli[ray]' (the same Ray version as the cluster)",
        ) from None
    return ray


def connect(address: str | None = None) -> str:
    """Join the Ray cluster at `address` (else SAGELLM_RAY_ADDRESS) once per process."""
    ray = _import_ray()
    with _lock:
        current = _connected.get("address")
        if ray.is_initialized():
            if address and current and address.strip() != current:
                raise BadInput(
                    f"this process is connected to the Ray cluster at {current}, not {address}",
                    hint="use one Ray cluster per sagellm state directory",
                )
            return current or address or ""
        address = (address or cluster_address(None) or "").strip()
        if not address:
            raise BadInput(
                "no Ray cluster address",
                hint="pass --cluster ray://HOST:PORT or set SAGELLM_RAY_ADDRESS",
            )
        _check_reachable(address)
        import logging

        try:
            ray.init(
                address=address,
                namespace=NAMESPACE,
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ResourceUnavailable(
                f"could not join the Ray cluster at {address}: {exc}",
                hint="check the address, and that this Ray is the cluster's version",
            ) from None
        _connected["address"] = address
        _quiet_cluster_errors()
        return address


def _quiet_cluster_errors() -> None:
    """Ray's driver prints cluster-wide errors (a node marked dead, with its raylet's log)
    on stdout, which would corrupt `--json`: they go to stderr instead, one line each."""
    try:
        import ray._private.worker as ray_worker  # pinned Ray (2.60): not public API
    except ImportError:
        return
    original = ray_worker.print_to_stdstream

    def to_stderr(data: dict[str, Any], ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":
            original(data, ignore_prefix)
            return
        for text in data.get("lines") or []:
            first = str(text).strip().splitlines()[:1]
            if first:
                sys.stderr.write(f"warning: ray: {first[0][:300]}\n")

    ray_worker.print_to_stdstream = to_stderr


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        sys.stderr.write(f"warning: {message}\n")


def node_name(node_id: str) -> str:
    """The record's `node` for a Ray node id."""
    return NODE_PREFIX + node_id[:NODE_ID_CHARS]


def is_ray_node(node: str) -> bool:
    """True for the `node` of an engine placed on a Ray cluster."""
    return node.startswith(NODE_PREFIX)


def pg_name(node: str, port: int) -> str:
    """The placement group of a GPU engine: its node and port name it uniquely."""
    return f"{ACTOR_PREFIX}{node[len(NODE_PREFIX) :]}-{port}"


def _nodes() -> list[dict[str, Any]]:
    import ray

    return ray.nodes()


def _find_node(node: str) -> dict[str, Any] | None:
    prefix = node[len(NODE_PREFIX) :]
    matches = [n for n in _nodes() if n["NodeID"].startswith(prefix)]
    alive = [n for n in matches if n.get("Alive")]
    return (alive or matches or [None])[0]


def _remote_error(info: dict[str, Any]) -> SageError:
    err = info["error"]
    kinds = {"BadInput": BadInput, "ResourceUnavailable": ResourceUnavailable}
    return kinds.get(err["kind"], OperationFailed)(err["message"], hint=err.get("hint"))


def _get(ref: Any, timeout: float, what: str) -> Any:
    """ray.get with a deadline; the task is cancelled when it runs out."""
    import ray
    from ray.exceptions import GetTimeoutError

    try:
        return ray.get(ref, timeout=timeout)
    except GetTimeoutError:
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=True)
        raise ResourceUnavailable(
            f"{what}: no answer from the Ray cluster within {timeout:.0f}s",
            hint="see `sage llm cluster status` for free CPUs and GPUs",
        ) from None


def _actor(engine_id: str):
    """The engine's actor handle, or None if there is none (never started, or dead)."""
    import ray

    try:
        return ray.get_actor(ACTOR_PREFIX + engine_id, namespace=NAMESPACE)
    except ValueError:
        return None


def _kill(actor) -> None:
    import ray

    with contextlib.suppress(Exception):
        ray.kill(actor, no_restart=True)


def _remove_pg(name: str) -> None:
    from ray.util import get_placement_group, remove_placement_group

    try:
        group = get_placement_group(name)
    except ValueError:
        return
    with contextlib.suppress(Exception):
        remove_placement_group(group)


def engines_per_node() -> dict[str, int]:
    """How many of our engine actors run on each node (by full node id)."""
    import ray

    refs = []
    for name in ray.util.list_named_actors():
        if name.startswith(ACTOR_PREFIX):
            with contextlib.suppress(ValueError):
                refs.append(ray.get_actor(name, namespace=NAMESPACE).info.remote())
    counts: dict[str, int] = {}
    for ref in refs:
        try:
            node_id = ray.get(ref, timeout=CALL_TIMEOUT_S)["node_id"]
        except Exception:  # noqa: BLE001 - a dying actor counts for nothing
            continue
        counts[node_id] = counts.get(node_id, 0) + 1
    return counts


# --------------------------------------------------------------------------- placement


@dataclass
class RayPlacement(Placement):
    """GPUs that Ray assigned on a node, held by a placement group (not by our ledger)."""

    pg_name: str = ""
    node: str = ""
    utilization: float = DEFAULT_GPU_UTILIZATION

    @property
    def cuda_visible_devices(self) -> str:
        """Ray's GPU ids on the node (the actor sets them again from Ray at spawn)."""
        return ",".join(str(i) for i in self.gpus)

    @property
    def gpu_memory_utilization(self) -> float:
        return self.utilization

    def env(self) -> dict[str, str]:
        return {**super().env(), PG_ENV: self.pg_name}

    def reservation(self, engine_id: str) -> GpuReservation:
        """Nothing on this machine's GPUs: the placement group holds the node's GPUs."""
        return GpuReservation(engine_id, [], 0.0)


class RayLauncher:
    """Runs engines as actor-owned process groups on a Ray cluster's nodes.

    `launcher_for_spec` makes one per new engine (its node is chosen by the first port
    call); `launcher_for(node)` keeps one per node for records that exist.
    """

    on_this_machine = False  # every call asks the cluster

    def __init__(self, node: str | None = None, *, spec: EngineSpec | None = None):
        self.node = node or NODE_PREFIX + "?"  # "?" until the first port call chooses
        self.spec = spec
        self.address = cluster_address(spec) if spec is not None else None
        self._node_id: str | None = None
        self._ip: str | None = None
        self._port: int | None = None
        self._gpus: int | None = None

    # -- choosing the node (under the state lock, from EngineManager._reserve) --------

    def allocate_port(self, host: str, taken: Iterable[int]) -> int:
        """A free port on the chosen node (the first call chooses the node)."""
        return self._port_on_node(taken, None)

    def check_port(self, host: str, port: int, taken: Iterable[int]) -> None:
        """Exit 4 if the port is recorded or bound on the chosen node."""
        self._port_on_node(taken, port)

    def engine_host(self, spec: EngineSpec) -> str:
        """The node's IP: the engine binds it and the gateway routes to it."""
        return self._ip or spec.host

    def _port_on_node(self, taken: Iterable[int], port: int | None) -> int:
        connect(self.address)
        from sagellm_cli.core.launchers.ray_actor import probe_port

        taken_list = sorted(set(taken))
        if self._node_id is None:
            task = self._first_probe().remote(taken_list, port)
        else:
            task = probe_port.options(scheduling_strategy=self._affinity()).remote(taken_list, port)
        info = _get(task, PROBE_TIMEOUT_S, "choosing a node for the engine")
        if self._node_id is None:
            self._node_id, self._ip = info["node_id"], info["ip"]
            self.node = node_name(info["node_id"])
        if "error" in info:
            raise _remote_error(info)
        self._port = info["port"]
        return info["port"]

    def _first_probe(self):
        """The port probe with the engine's resource shape: Ray runs it on a node with room
        (with `placement: spread`, preferably the node with the fewest of our engines)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from sagellm_cli.core.launchers.ray_actor import probe_port

        spec = self._spec()
        if spec.gpus is not None:
            raise BadInput(
                "--gpus pins this machine's NVML indices; on a Ray cluster Ray assigns GPUs",
                hint="leave --gpus out; -tp and -pp give the number of GPUs",
            )
        nodes = [n for n in _nodes() if n.get("Alive")]
        cluster_gpus = sum(n["Resources"].get("GPU", 0) for n in nodes)
        self._gpus = gpus = spec.gpu_count(cluster_gpus > 0)
        fits = [
            n
            for n in nodes
            if n["Resources"].get("CPU", 0) >= 1 and n["Resources"].get("GPU", 0) >= gpus
        ]
        what = f"{gpus} GPU(s) and a CPU" if gpus else "a CPU"
        if not fits:
            raise ResourceUnavailable(
                f"no node of the Ray cluster has {what} for {spec.model}",
                hint="see `sage llm cluster status`",
            )
        free = ray.available_resources()
        if free.get("CPU", 0) < 1 or free.get("GPU", 0) < gpus:
            raise ResourceUnavailable(
                f"the Ray cluster has no free {what} for {spec.model}",
                hint="stop an engine or add a node; see `sage llm cluster status`",
            )
        strategy: Any = "DEFAULT"
        if spec.placement == "spread":
            counts = engines_per_node()
            target = min(fits, key=lambda n: (counts.get(n["NodeID"], 0), n["NodeID"]))
            strategy = NodeAffinitySchedulingStrategy(target["NodeID"], soft=True)
        return probe_port.options(num_cpus=1, num_gpus=gpus, scheduling_strategy=strategy)

    def _spec(self) -> EngineSpec:
        if self.spec is None:
            raise OperationFailed(f"launcher for {self.node} has no engine spec to place")
        return self.spec

    def _affinity(self, *, fail: bool = False):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return NodeAffinitySchedulingStrategy(
            self._resolve_node_id(), soft=False, _fail_on_unavailable=fail
        )

    def _resolve_node_id(self) -> str:
        if self._node_id is None:
            node = _find_node(self.node)
            if node is None:
                raise ResourceUnavailable(f"Ray node {self.node} is not in the cluster")
            self._node_id, self._ip = node["NodeID"], node["NodeManagerAddress"]
        return self._node_id

    def place(
        self, spec: EngineSpec, runtime: str, state: State, live: list[EngineRecord]
    ) -> tuple[Placement | None, list[int]]:
        """CPU engines: nothing to reserve here (the actor holds a CPU). GPU engines: a
        placement group on the chosen node, and the GPU ids Ray gives it."""
        if spec.gpus is not None:
            raise BadInput("--gpus pins this machine's NVML indices; Ray assigns GPUs here")
        if not self._gpus:
            return None, []
        return self._place_gpus(spec, self._gpus), []

    def _place_gpus(self, spec: EngineSpec, gpus: int) -> RayPlacement:
        from ray.util import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from sagellm_cli.core.launchers.ray_actor import gpu_info

        if self._port is None:
            raise OperationFailed("a Ray placement needs the engine's port first")
        name = pg_name(self.node, self._port)
        _remove_pg(name)  # a dead engine's, on the same node and port
        group = placement_group(
            [{"CPU": 1, "GPU": gpus}],
            strategy="STRICT_PACK",
            name=name,
            lifetime="detached",
            bundle_label_selector=[{"ray.io/node-id": self._resolve_node_id()}],
        )
        if not group.wait(PG_TIMEOUT_S):
            remove_placement_group(group)
            raise ResourceUnavailable(
                f"{gpus} GPU(s) on Ray node {self.node} were not free within {PG_TIMEOUT_S:.0f}s",
                hint="see `sage llm cluster status`",
            )
        try:
            strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
            task = gpu_info.options(num_cpus=0, num_gpus=gpus, scheduling_strategy=strategy)
            info = _get(task.remote(), PROBE_TIMEOUT_S, "reading the node's GPUs")
        except BaseException:
            remove_placement_group(group)
            raise
        ids = [int(g) for g in info["gpu_ids"]]
        by_index = {g["index"]: g for g in info["inventory"].get("gpus", [])}
        totals = [by_index[i]["memory_total_mib"] / 1024 for i in ids if i in by_index]
        utilization = DEFAULT_GPU_UTILIZATION
        if spec.gpu_memory_gb is not None and len(totals) == len(ids) and totals:
            utilization = min(max(spec.gpu_memory_gb / min(totals), 0.001), 0.95)
        return RayPlacement(
            gpus=ids,
            uuids=[by_index[i]["uuid"] if i in by_index else "" for i in ids],
            gib_per_gpu=spec.gpu_memory_gb or (min(totals) * utilization if totals else 0.0),
            total_gib=totals if len(totals) == len(ids) else [],
            pg_name=name,
            node=self.node,
            utilization=utilization,
        )

    # -- the engine's life (through its actor) -----------------------------------------

    def scratch_dir(self, engine_id: str) -> Path:
        """The engine's TMPDIR as named on every node; the actor creates it there."""
        return Path(tempfile.gettempdir()) / f"sagellm-{os.getuid()}" / engine_id

    def spawn(
        self, engine_id: str, argv: list[str], env: dict[str, str], log_path: Path
    ) -> ProcessHandle:
        """Create the engine's detached actor on the node and have it start the engine."""
        try:
            connect(self.address)
        except SageError as exc:
            raise OSError(exc.one_line()) from None
        import ray
        from ray.util import get_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        env = dict(env)
        group_name = env.pop(PG_ENV, None)
        options: dict[str, Any] = {
            "name": ACTOR_PREFIX + engine_id,
            "namespace": NAMESPACE,
            "lifetime": "detached",
            "num_cpus": 1,
        }
        group = None
        try:
            if group_name:
                group = get_placement_group(group_name)
                options["num_gpus"] = group.bundle_specs[0].get("GPU", 0)
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group, 0)
            else:
                options["scheduling_strategy"] = self._affinity(fail=True)
        except (ValueError, SageError) as exc:
            raise OSError(f"Ray node {self.node}: {exc}") from None
        stale = _actor(engine_id)
        if stale is not None:  # an earlier run of this engine
            _kill(stale)
        try:
            actor = self._create(options)
        except OSError:
            if group is not None:
                _remove_pg(group_name or "")
            raise
        try:
            info = ray.get(
                actor.start.remote(argv, env, str(log_path)), timeout=ACTOR_START_TIMEOUT_S
            )
        except Exception as exc:  # noqa: BLE001 - any failure: nothing may stay behind
            _kill(actor)
            if group is not None:
                _remove_pg(group_name or "")
            raise OSError(
                f"Ray could not start the engine on node {self.node}: {_short(exc)}"
            ) from None
        _exit_codes.pop(engine_id, None)
        return ProcessHandle(
            pid=info["pid"],
            pgid=info["pgid"],
            create_time=info["create_time"],
            instance=f"{options['name']}#{info['pid']}",  # the actor's name, this run's pid
        )

    def _create(self, options: dict[str, Any]):
        from sagellm_cli.core.launchers.ray_actor import RemoteEngineActor

        engine_id = options["name"][len(ACTOR_PREFIX) :]
        deadline = time.monotonic() + NAME_RETRY_S
        while True:
            try:
                return RemoteEngineActor.options(**options).remote(engine_id)
            except ValueError as exc:  # the name of a just-killed actor is not free yet
                if "already taken" not in str(exc) or time.monotonic() > deadline:
                    raise OSError(f"Ray refused the engine's actor: {exc}") from None
                time.sleep(0.2)

    def _connected_for(self, record: EngineRecord) -> bool:
        """Join the record's cluster; False (with one warning) when it can't be reached."""
        try:
            connect(record.spec.cluster if record.spec else None)
        except SageError as exc:
            _warn_once(f"can't check engines on Ray node {record.node}: {exc.one_line()}")
            return False
        return True

    def is_alive(self, record: EngineRecord) -> bool:
        """The actor answers and its engine's main process runs. A dead actor (its node
        died) is a dead engine; a cluster that can't be reached tells nothing (True)."""
        if not self._connected_for(record):
            return True
        from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

        actor = _actor(record.id)
        if actor is None:
            return False
        import ray

        try:
            status = ray.get(actor.status.remote(), timeout=ALIVE_TIMEOUT_S)
        except (GetTimeoutError, ActorUnavailableError):
            return True  # not known yet: Ray declares a lost node dead after its checks
        except RayActorError:
            return False
        return bool(status["alive"]) and (record.pid is None or status["pid"] == record.pid)

    def has_leftovers(self, record: EngineRecord) -> bool:
        """Any process of the engine left on its node (False once the actor is gone)."""
        if not self._connected_for(record):
            return False
        actor = _actor(record.id)
        if actor is None:
            return False
        import ray

        try:
            return bool(ray.get(actor.leftovers.remote(), timeout=CALL_TIMEOUT_S))
        except Exception:  # noqa: BLE001 - an actor that can't answer owns nothing we can stop
            return False

    def terminate(self, record: EngineRecord, timeout: float) -> int:
        """Stop the engine's group through its actor, then kill the actor and free its
        placement group; return how many processes needed SIGKILL."""
        if not self._connected_for(record):
            return 0
        import ray

        killed = 0
        actor = _actor(record.id)
        if actor is not None:
            try:
                out = ray.get(
                    actor.stop.remote(timeout, record.host, record.port), timeout=timeout + 30
                )
                killed = int(out["killed"])
                _exit_codes[record.id] = (record.pid, out["exit_code"])
                ray.get(actor.cleanup.remote(), timeout=CALL_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - a dead actor's node took the engine with it
                pass
            _kill(actor)
        _remove_pg(pg_name(record.node, record.port))
        return killed

    def exit_code(self, record: EngineRecord) -> int | None:
        """The code `terminate` read, else the actor's (None once the actor is gone)."""
        known = _exit_codes.get(record.id)
        if known is not None and known[0] == record.pid:
            return known[1]
        if not self._connected_for(record):
            return None
        actor = _actor(record.id)
        if actor is None:
            return None
        import ray

        try:
            status = ray.get(actor.status.remote(), timeout=CALL_TIMEOUT_S)
        except Exception:  # noqa: BLE001
            return None
        if status["exit_code"] is not None:
            _exit_codes[record.id] = (status["pid"], status["exit_code"])
        return status["exit_code"]

    def wait_port_free(self, record: EngineRecord, timeout: float = 5.0) -> None:
        """Nothing to do: the actor's stop waited for the port on its node."""

    def cleanup(self, record: EngineRecord, *, forget: bool = False) -> None:
        """Remove the engine's scratch space on its node, its actor and placement group."""
        if not self._connected_for(record):
            return
        import ray

        actor = _actor(record.id)
        if actor is not None:
            # Once the actor is gone so is the exit code: keep it for this process (a
            # reconcile may clean up on a read-only pass and record the death on the next).
            self.exit_code(record)
            with contextlib.suppress(Exception):
                ray.get(actor.cleanup.remote(), timeout=CALL_TIMEOUT_S)
            _kill(actor)
        _remove_pg(pg_name(record.node, record.port))
        if forget:
            _exit_codes.pop(record.id, None)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
