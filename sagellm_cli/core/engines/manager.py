"""Engine lifecycle: start, wait for readiness, stop, restart, prune, reconcile.

Every change goes through the state lock; long waits (loading, stopping) happen
outside it so that other shells are never blocked behind one engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sagellm_cli.core import paths
from sagellm_cli.core.credentials import engine_environ, redact_argv
from sagellm_cli.core.engines import logs, supervision
from sagellm_cli.core.errors import (
    BadInput,
    NotFound,
    OperationFailed,
    ResourceUnavailable,
    SageError,
)
from sagellm_cli.core.inputs.limits import check_exec_size
from sagellm_cli.core.launchers.base import Launcher, launcher_for, launcher_for_spec
from sagellm_cli.core.lifecycle import EXPECTED_EXIT, PROBED, Status, allowed, transition
from sagellm_cli.core.records import (
    EXTERNAL,
    NIXL,
    ROLES,
    VLLM,
    EngineRecord,
    EngineSpec,
    resolve_runtime,
)
from sagellm_cli.core.state import State, StateStore

if TYPE_CHECKING:
    from sagellm_cli.core.gpu import Placement

LOG_TAIL_ON_FAILURE = 20
# A record without a pid is a spawn in progress; after this long it never happened.
SPAWN_GRACE_S = 120.0
# Gated starts per GPU (see _wait_turn): how often a queued engine looks, and for how long.
QUEUE_POLL_S = 0.5
QUEUE_LIMIT_S = 1800.0
KV_BYTES_FLAG = "--kv-cache-memory-bytes"
# wait_ready: how often /health is probed, and how often the record and log are looked at.
PROBE_INTERVAL_S = 0.05
STATE_INTERVAL_S = 0.5
# A first generation can take seconds (kernels warm up); a refused connection returns at once.
READY_PROBE_TIMEOUT_S = 30.0
# Polls (50 ms apart) for the exit code of an engine found dead.
EXIT_CODE_POLLS = 10
# How long a dead engine's helpers get to exit on SIGTERM before SIGKILL.
REAP_TIMEOUT_S = 5.0


@dataclass
class Progress:
    """What a waiting caller shows: one engine's status while it loads."""

    engine_id: str
    status: str  # a Status, or the loading phase read from the log
    elapsed: float
    last_log_line: str


ProgressCallback = Callable[[Progress], None]

# Supervision fields a record keeps when it is started again under the same id.
_CARRIED = ("created_at", "restarts", "last_exit", "restart_times", "launch_env", "held_until")
# Variables that select or key vLLM's compile cache (VLLM_CACHE_ROOT, torch inductor's and
# Triton's caches); names that look like secrets are never written to the state file.
_PINNED_PREFIXES = ("VLLM_", "TORCHINDUCTOR_", "TRITON_", "XDG_CACHE_HOME")
_SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


def pinned_env(environ: dict[str, str]) -> dict[str, str]:
    """The part of a caller's environment that a restart must see unchanged."""
    return {
        name: value
        for name, value in environ.items()
        if name.startswith(_PINNED_PREFIXES) and not any(w in name for w in _SECRET_WORDS)
    }


@dataclass
class Reuse:
    """Start again as an existing record: its id, and where it ran (kept when still free)."""

    engine_id: str
    port: int | None = None
    gpus: list[int] | None = None
    # The record must still have one of these statuses (else it was stopped meanwhile).
    only_if: frozenset[Status] | None = None


def validate_spec(spec: EngineSpec) -> str:
    """Check a spec before anything is reserved; return its runtime."""
    import math

    if not spec.model or not spec.model.strip():
        raise BadInput("MODEL is empty", hint="give a model path or a Hugging Face id")
    if spec.runtime == EXTERNAL:
        raise BadInput(
            "external engines are registered, not started",
            hint="use `sage llm engine register URL --model NAME`",
        )
    runtime = resolve_runtime(spec.kind, spec.runtime)
    if spec.tensor_parallel < 1 or spec.pipeline_parallel < 1:
        raise BadInput("tensor and pipeline parallel sizes must be at least 1")
    if spec.max_model_len is not None and spec.max_model_len < 1:
        raise BadInput("--max-model-len must be positive")
    for name, value in (
        ("--kv-cache-gb", spec.kv_cache_gb),
        ("--gpu-memory-gb", spec.gpu_memory_gb),
    ):
        # nan compares false to everything and inf overflows byte counts: finite only.
        if value is not None and not (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value > 0
        ):
            raise BadInput(f"{name} must be a finite positive number of GiB (got {value!r})")
    from sagellm_cli.core.launchers.ports import check_host

    check_host(spec.host)  # `[::1]` or an unknown name: exit 2 now, not at bind time
    if spec.kv_events and (runtime != "vllm" or spec.kind != "llm"):
        raise BadInput(
            "--kv-events needs a vLLM llm engine (its KV cache publishes the events)",
            hint="drop --kv-events for this engine",
        )
    if spec.role not in ROLES:
        raise BadInput(f"unknown role {spec.role!r}", hint=f"use one of {', '.join(ROLES)}")
    if spec.kv_connector is not None and (spec.kind != "llm" or runtime != VLLM):
        raise BadInput(
            f"--kv-connector needs an llm engine on vLLM (this is {spec.kind} on {runtime})",
            hint="drop --kv-connector",
        )
    if spec.placement not in ("pack", "spread"):
        raise BadInput(f"unknown placement {spec.placement!r}", hint="use pack or spread")
    if spec.lora and (spec.kind != "llm" or runtime != VLLM):
        raise BadInput(
            f"LoRA adapters need an llm engine on vLLM (this is {spec.kind} on {runtime})",
            hint="drop --enable-lora and --lora-adapter",
        )
    # The checks above word the common mistakes in the CLI's terms; the strict model that
    # presets and the management API use then covers every field the same way.
    from sagellm_cli.core.inputs.spec_schema import check_spec

    check_spec(spec)
    return runtime


class EngineManager:
    """The one implementation behind `sage llm engine`, presets and the management API."""

    def __init__(self, store: StateStore | None = None):
        self.store = store or StateStore()

    # -- reading -------------------------------------------------------------

    def reconcile(self, state: State) -> bool:
        """Bring records in line with the processes that really run (no network I/O).

        Returns True if a record changed (an engine was found dead).
        """
        now = time.time()
        changed = False
        for record in state.engines.values():
            if not record.is_live:
                continue
            if not record.has_process:
                if (
                    record.status == Status.RESTARTING
                    and not supervision.supervised(state)
                    and transition(record, Status.FAILED)
                ):
                    # Nobody will restart it: give its port and GPU memory back.
                    record.next_restart_at = None
                    record.error = (
                        f"{record.error or 'crashed'}; not restarted: no `sage llm serve`"
                    )
                    state.release(record.id)
                    changed = True
                continue
            if record.pid is None:
                # Queued engines wait their turn on a GPU (bounded by QUEUE_LIMIT_S).
                grace = SPAWN_GRACE_S + (QUEUE_LIMIT_S if record.status == Status.QUEUED else 0)
                if now - record.created_at > grace:
                    self._mark_dead(state, record, "spawn never completed")
                    changed = True
                continue
            if not launcher_for(record.node).is_alive(record):
                self._mark_dead(state, record, None)
                changed = True
        return changed

    def refresh(self, *, probe_health: bool = False) -> State:
        """Reconcile under the lock, reap orphans and probe readiness outside it.

        Probes can take up to their timeout each; holding the lock meanwhile would stall
        every other command and the gateway's reads.
        """
        # Most of the time nothing died: look with a shared lock first, and take the
        # exclusive one (which re-reads and may rewrite the file) only when needed.
        state = self.store.read()
        if self.reconcile(state):
            with self.store.transaction() as state:
                self.reconcile(state)
        if any(r.orphans for r in state.engines.values()):
            state = self.reap(state)
        due = [
            r
            for r in state.engines.values()
            if r.pid is not None
            and (r.status == Status.STARTING or (probe_health and r.status in PROBED))
        ]
        if not due:
            return state
        healthy = {
            r.id: (r.instance, _probe_ready(r, 1.0, generate=r.status == Status.STARTING).ready)
            for r in due
        }
        with self.store.transaction() as state:
            self.reconcile(state)
            now = time.time()
            for engine_id, (instance, ok) in healthy.items():
                record = state.engines.get(engine_id)
                if record is None or record.instance != instance or not record.is_live:
                    continue  # restarted or stopped meanwhile: the probe is stale
                hung = record.unresponsive_since is not None  # /health is not enough then
                if ok and not hung and record.status in (Status.STARTING, Status.UNHEALTHY):
                    transition(record, Status.READY)
                    record.ready_at = record.ready_at or now
                elif not ok and record.status == Status.READY:
                    transition(record, Status.UNHEALTHY)
        return state

    def reap(self, state: State) -> State:
        """Stop the helpers of dead engines (outside the lock), then release what they held.

        A killed API server leaves vLLM's EngineCore running with its memory; until it is
        gone the engine's reservation stays, so the memory is never counted as free.
        """
        orphaned = [r for r in state.engines.values() if r.orphans]
        for record in orphaned:
            launcher_for(record.node).terminate(record, timeout=REAP_TIMEOUT_S)
        with self.store.transaction() as state:
            for record in orphaned:
                current = state.engines.get(record.id)
                if current is None or not current.orphans:
                    continue
                launcher = launcher_for(current.node)
                if not launcher.has_leftovers(current):
                    current.orphans = False
                    _release(state, current)
                    launcher.cleanup(current)
        return state

    def _mark_dead(self, state: State, record: EngineRecord, reason: str | None) -> None:
        launcher = launcher_for(record.node)
        record.exit_code = _exit_code(launcher, record)
        now = time.time()
        if not reason:
            reason = (
                f"engine process exited with code {record.exit_code}"
                if record.exit_code is not None
                else "engine process is gone"
            )
        if record.status in EXPECTED_EXIT:
            transition(record, EXPECTED_EXIT[record.status])
        elif not (
            supervision.supervised(state) and supervision.schedule_restart(record, now, reason)
        ) and transition(record, Status.FAILED, reason=reason):
            note = logs.crash_note(record.log_path, supervision.CRASH_LOG_LINES)
            record.error = f"{reason}; {note}"
        record.stopped_at = now if record.status == Status.RESTARTING else record.stopped_at or now
        if launcher.has_leftovers(record):
            record.orphans = True  # reap() stops them and then releases the reservation
            return
        _release(state, record)
        launcher.cleanup(record)

    def list(
        self, *, include_all: bool = False, probe_health: bool = False, state: State | None = None
    ) -> list[EngineRecord]:
        """Engines, reconciled with reality (or from a `refresh()` the caller just made);
        stopped and failed ones only with `include_all`."""
        if state is None:
            state = self.refresh(probe_health=probe_health)
        records = list(state.engines.values())
        records.sort(key=lambda r: r.created_at)
        return [r for r in records if include_all or r.is_live]

    def snapshot(self) -> State:
        """A reconciled view without writing anything (for dry runs)."""
        state = self.store.read()
        self.reconcile(state)
        return state

    def get(self, ref: str, *, probe_health: bool = True) -> EngineRecord:
        """One engine by id, unique id prefix or label (exit 3 if unknown)."""
        return resolve_ref(self.refresh(probe_health=probe_health), ref)

    def failure_report(self, engine_id: str) -> tuple[str | None, list[str]]:
        """The exception that ended an engine's last run (None when its log has none) and
        the last LOG_TAIL_ON_FAILURE lines of its log."""
        return logs.cause_and_tail(paths.logs_dir() / f"{engine_id}.log", LOG_TAIL_ON_FAILURE)

    # -- starting ------------------------------------------------------------

    def spawn(self, spec: EngineSpec, *, reuse: Reuse | None = None) -> EngineRecord:
        """Reserve a port and GPUs under the lock, then start the process outside it."""
        from sagellm_cli.core.launchers.runtimes import build_launch

        runtime = validate_spec(spec)
        with self.store.transaction() as state:
            self.reconcile(state)
            record, placement = self._reserve(state, spec, runtime, reuse)
            if spec.unload == "sleep" and (placement is None or placement.mock):
                raise BadInput(
                    "unload: sleep needs vLLM on a real GPU (vLLM's sleep mode is CUDA-only)",
                    hint="use unload: stop, which stops the idle engine instead",
                )
            launcher = launcher_for(record.node)
            launch = build_launch(
                dataclasses.replace(spec, host=record.host),  # a Ray node's IP, or --host
                runtime=runtime,
                port=record.port,
                served_model_name=record.served_model_name,
                # Mock GPUs exist for placement tests: the process itself runs on CPU.
                placement=None if placement is None or placement.mock else placement,
                cpu_cores=record.cpu_cores,
                kv_events_port=record.kv_events_port,
                nixl_port=record.nixl_port,
                on_this_machine=launcher.on_this_machine,
                scratch_dir=launcher.scratch_dir(record.id),
                cache_dir=paths.ensure_private_dir(paths.private_cache_dir(record.id))
                if spec.cache == "private"
                else None,
            )
            record.command, record.notes = launch.argv, launch.notes
            # The gateway's credentials never reach an engine, even when it starts one.
            base = engine_environ()
            if record.launch_env is None:  # a first start; restarts carry the first one's
                record.launch_env = pinned_env(base)
            env = {
                **base,
                **(record.launch_env or {}),
                **launch.env,
                **spec.env,
                "SAGELLM_ENGINE_ID": record.id,
            }
            env.setdefault("PYTHONUNBUFFERED", "1")
            # Over ARG_MAX the spawn would fail (E2BIG) after the record exists: refuse
            # here, inside the transaction, so nothing is recorded.
            check_exec_size(launch.argv, env)
        if record.status == Status.QUEUED:
            self._wait_turn(record)
        log_path = Path(record.log_path)
        paths.ensure_private_dir(log_path.parent)
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(
                f"\n[sagellm] {time.strftime('%Y-%m-%d %H:%M:%S')} starting engine "
                f"{record.id}: {shlex.join(redact_argv(launch.argv))}\n"
            )
            log.writelines(f"[sagellm] {note}\n" for note in launch.notes)
        try:
            # Taken before the spawn: every process of the engine is younger (see group_members).
            spawned_at = time.time()
            handle = launcher.spawn(record.id, launch.argv, env, log_path)
        except OSError as exc:
            with self.store.transaction() as state:
                failed = state.engines.get(record.id)
                if failed and transition(failed, Status.FAILED, reason="spawn failed"):
                    failed.error = f"spawn failed: {exc}"
                    state.release(record.id)
            raise OperationFailed(f"could not start engine {record.id}: {exc}") from None
        with self.store.transaction() as state:
            current = state.engines.get(record.id)
            if current is not None and current.status == Status.STARTING:
                current.pid, current.pgid = handle.pid, handle.pgid
                current.pid_create_time, current.instance = handle.create_time, handle.instance
                current.started_at = spawned_at
                return current
        # Stopped or pruned while the process was being spawned: don't leave it behind.
        record.pid, record.pgid = handle.pid, handle.pgid
        record.pid_create_time, record.started_at = handle.create_time, spawned_at
        record.instance = handle.instance
        launcher.terminate(record, timeout=10.0)
        raise OperationFailed(f"engine {record.id} was stopped while starting")

    def _reserve(
        self,
        state: State,
        spec: EngineSpec,
        runtime: str,
        reuse: Reuse | None,
        status: Status | None = None,
    ) -> tuple[EngineRecord, Placement | None]:
        """Make the record (QUEUED or STARTING unless `status` says) with its port and
        reservation; a reused id is checked against the transition table."""
        reuse_id = reuse.engine_id if reuse else None
        old = state.engines.get(reuse_id) if reuse_id else None
        if reuse and reuse.only_if is not None and (old is None or old.status not in reuse.only_if):
            raise OperationFailed(f"engine {reuse_id} was stopped meanwhile; not started")
        live = [r for r in state.engines.values() if r.is_live and r.id != reuse_id]
        taken = state.taken_ports(exclude={reuse_id} if reuse_id else set())
        check_label_free(live, spec.label)
        launcher = launcher_for_spec(spec)
        port = _choose_port(launcher, spec, taken, reuse.port if reuse else None)
        taken = taken | {port}
        # KV events (vLLM llm engines: validate_spec): a second port, for the ZMQ publisher.
        events_port = None
        if spec.kv_events:
            events_port = launcher.allocate_port(spec.host, taken)
            taken.add(events_port)
        nixl_port = None  # NIXL's side channel; on a Ray node vLLM's default (known-issues.md)
        if spec.kv_connector == NIXL and launcher.on_this_machine:
            nixl_port = launcher.allocate_port(spec.host, taken)
        if reuse_id:
            state.release(reuse_id)  # a restart may take its own reservation again
        placement, cpu_cores = _place(launcher, spec, runtime, state, live, reuse)
        engine_id = reuse_id or new_engine_id(state)
        now = time.time()
        record = EngineRecord(
            id=engine_id,
            kind=spec.kind,
            runtime=runtime,
            model=spec.model,
            served_model_name=spec.served_model_name or spec.model,
            host=launcher.engine_host(spec),
            port=port,
            label=spec.label,
            status=status
            or (
                Status.QUEUED
                if _must_queue(state, spec, runtime, placement, reuse_id)
                else Status.STARTING
            ),
            gpus=list(placement.gpus) if placement else [],
            gpu_memory_gb=placement.gib_per_gpu if placement else None,
            created_at=now,
            log_path=str(paths.logs_dir() / f"{engine_id}.log"),
            preset=spec.preset,
            role=spec.role,
            nixl_port=nixl_port,
            node=launcher.node,
            cpu_cores=cpu_cores,
            kv_events_port=events_port,
            spec=spec,
        )
        if old is not None and not allowed(old.status, record.status):
            # Say, a live engine started again under its id: stop it first.
            raise OperationFailed(
                f"engine {reuse_id} is {old.status}; it cannot become {record.status}",
                hint=f"stop it first: `sage llm engine stop {reuse_id}`",
            )
        if old is not None:
            for name in _CARRIED:
                setattr(record, name, getattr(old, name))
        state.engines[engine_id] = record
        if placement:
            state.reservations[engine_id] = placement.reservation(engine_id)
        return record, placement

    def _wait_turn(self, record: EngineRecord) -> None:
        """Hold a queued engine until no engine on its GPUs must load first, then mark it
        starting.

        vLLM sizes its KV cache from free-memory readings taken while it profiles; a
        neighbour loading at the same time corrupts them (measured on an H200: 19.5 and
        1.5 GiB for two 20 GiB reservations). Engines given --kv-cache-memory-bytes don't
        read free memory and load together; one that profiles waits until the engines
        ahead of it have sized their KV cache, and they wait for it likewise (pipeline).
        `SAGELLM_GPU_START_MODE=serial` waits until they are ready.
        """
        deadline = time.monotonic() + QUEUE_LIMIT_S
        try:
            while True:
                with self.store.transaction() as state:
                    self.reconcile(state)
                    current = state.engines.get(record.id)
                    if current is None or current.status != Status.QUEUED:
                        raise OperationFailed(f"engine {record.id} was stopped while queued")
                    if not _loading_before(state, current):
                        transition(current, Status.STARTING)
                        return
                if time.monotonic() > deadline:
                    raise OperationFailed(
                        f"engine {record.id} waited {QUEUE_LIMIT_S:.0f}s for its GPU",
                        hint="see `sage llm engine list` for the engine that is loading",
                    )
                time.sleep(QUEUE_POLL_S)
        except BaseException:
            # Ctrl-C or a timeout: a queued record must not stay behind, holding memory.
            with self.store.transaction() as state:
                current = state.engines.get(record.id)
                if current is not None and transition(current, Status.STOPPED):
                    current.stopped_at = time.time()
                    current.error = "stopped while queued"
                    state.release(record.id)
            raise

    def wait_ready(
        self,
        engine_id: str,
        *,
        timeout: float = 600.0,
        on_progress: ProgressCallback | None = None,
    ) -> EngineRecord:
        """Block until the engine is ready; on exit or timeout, fail with the log tail.

        `/health` is probed every PROBE_INTERVAL_S (a refused connection costs nothing), so
        readiness is seen within about that of vLLM's own; the state file, liveness and
        progress are looked at every STATE_INTERVAL_S.
        """
        started = time.monotonic()
        next_look = 0.0
        record = self._current(engine_id)
        while True:
            elapsed = time.monotonic() - started
            if elapsed >= next_look:
                next_look = elapsed + STATE_INTERVAL_S
                record = self._current(engine_id)
                self._check_loading(record)
                if elapsed > timeout:
                    self._stop_record(
                        engine_id,
                        timeout=30.0,
                        final_status=Status.FAILED,
                        error=f"not ready after {timeout:.0f}s",
                    )
                    raise self._load_failure(
                        engine_id,
                        f"engine {engine_id} was not ready after {timeout:.0f}s and was stopped",
                    )
                if on_progress:
                    phase, line = logs.loading_view(record.log_path)
                    on_progress(Progress(engine_id, phase or record.status, elapsed, line))
            check = _probe_ready(record, READY_PROBE_TIMEOUT_S) if record.pid else None
            if check is not None and check.failure:
                self._stop_record(engine_id, timeout=30.0, final_status=Status.FAILED,
                                  error=f"engine is up but {check.failure}")  # fmt: skip
                raise self._load_failure(
                    engine_id, f"engine {engine_id} is up but {check.failure}; it was stopped"
                )
            if check is not None and check.ready:
                with self.store.transaction() as state:
                    current = state.engines.get(engine_id)
                    if current is not None and current.status in (
                        Status.STARTING,
                        Status.UNHEALTHY,
                    ):
                        transition(current, Status.READY)
                        current.ready_at = time.time()
                self.check_gpu_use(engine_id)
                return current or record
            time.sleep(PROBE_INTERVAL_S)

    def check_gpu_use(self, engine_id: str):
        """Compare NVML's use of a running engine with its reservation and mark the ledger
        when it is over by more than max(5 %, 0.5 GiB); return the `OverUse` or None."""
        from sagellm_cli.core.gpu import overuse

        state = self.store.read()
        reservation = state.reservations.get(engine_id)
        if reservation is None or reservation.mock:
            return None
        try:
            used = overuse.engine_usage(state, engine_id)
        except Exception:  # noqa: BLE001 - NVML went away: nothing to compare
            return None
        over = overuse.find_overuse(reservation, used)
        with self.store.transaction() as state:
            current = state.reservations.get(engine_id)
            if current is not None:
                current.over_gib = over.over_gib if over else None
                current.over_gpu = over.gpu if over else None
        return over

    def _check_loading(self, record: EngineRecord) -> None:
        """Fail (with the log tail) if the engine was stopped or its process exited."""
        launcher = launcher_for(record.node)
        engine_id = record.id
        if record.status in (Status.STOPPED, Status.STOPPING) or (
            record.status == Status.FAILED and not launcher.is_alive(record)
        ):
            raise self._load_failure(engine_id, f"engine {engine_id} stopped while loading")
        if not launcher.is_alive(record):
            # The main process is gone; its helpers (EngineCore, workers) must not linger.
            launcher.terminate(record, timeout=10.0)
            with self.store.transaction() as state:
                self.reconcile(state)
                current = state.engines.get(engine_id)
            code = current.exit_code if current else None
            detail = f" with code {code}" if code is not None else ""
            if current is not None and current.status == Status.RESTARTING:
                detail += f"; the gateway restarts it (restart: {current.spec.restart})"
            raise self._load_failure(engine_id, f"engine {engine_id} exited during load{detail}")

    def _current(self, engine_id: str) -> EngineRecord:
        record = self.store.read().engines.get(engine_id)
        if record is None:
            raise OperationFailed(f"engine {engine_id} was removed while loading")
        return record

    def _load_failure(self, engine_id: str, message: str) -> OperationFailed:
        """The error for an engine that did not come up: its own exception in one line when
        the log has one (the traceback stays in the log), else the log's tail."""
        cause, tail = self.failure_report(engine_id)
        return OperationFailed(
            f"{message}: {cause}" if cause else message,
            hint=f"see `sage llm engine logs {engine_id}`",
            details=None if cause else "\n".join(tail),
        )

    # -- stopping ------------------------------------------------------------

    def stop(self, ref: str, *, timeout: float = 30.0) -> EngineRecord:
        """Stop an engine's whole process tree. Stopping a stopped engine is a no-op."""
        with self.store.transaction() as state:
            self.reconcile(state)
            engine_id = resolve_ref(state, ref).id
        return self._stop_record(engine_id, timeout=timeout, final_status=Status.STOPPED)

    def stop_all(self, *, timeout: float = 30.0, preset: str | None = None) -> list[EngineRecord]:
        """Stop every engine (or every engine of one preset)."""
        with self.store.transaction() as state:
            self.reconcile(state)
            ids = [
                r.id
                for r in state.engines.values()
                if (r.is_live or launcher_for(r.node).has_leftovers(r))
                and (preset is None or r.preset == preset)
            ]
        return [self._stop_record(i, timeout=timeout, final_status=Status.STOPPED) for i in ids]

    def _stop_record(
        self,
        engine_id: str,
        *,
        timeout: float,
        final_status: Status,
        error: str | None = None,
        interim: Status = Status.STOPPING,
        only_if: frozenset[Status] | None = None,
    ) -> EngineRecord | None:
        """Mark the engine `interim` under the lock, stop its processes outside it, then set
        `final_status` and release what it held.

        `final_status` IDLE keeps the record registered (an unload); RESTARTING hands it
        to the restart policy with its reservation kept (a hung engine). With `only_if`,
        nothing happens (None) unless the engine has one of those statuses.
        """
        with self.store.transaction() as state:
            record = state.engines[engine_id]
            if only_if is not None and record.status not in only_if:
                return None
            launcher = launcher_for(record.node)
            was_live = record.is_live
            if not was_live and not launcher.has_leftovers(record):
                return record
            if was_live and not transition(record, interim):
                return None  # the table refuses it (logged): leave the engine as it is
        launcher.terminate(record, timeout)
        with self.store.transaction() as state:
            record = state.engines.get(engine_id, record)
            record.exit_code = launcher.exit_code(record)
            if was_live and record.status == interim:  # not stopped by someone else meanwhile
                now = time.time()
                record.stopped_at = now
                record.error = error or record.error
                if final_status != Status.RESTARTING or not supervision.schedule_restart(
                    record, now, error or "restarted"
                ):
                    transition(
                        record,
                        Status.FAILED if final_status == Status.RESTARTING else final_status,
                    )
            record.orphans = False
            _release(state, record)
        launcher.cleanup(record)
        launcher.wait_port_free(record)
        return record

    def restart(
        self,
        ref: str,
        *,
        wait: bool = True,
        timeout: float = 600.0,
        stop_timeout: float = 30.0,
        on_progress: ProgressCallback | None = None,
    ) -> EngineRecord:
        """Stop and start again with the same id, port and options."""
        if self.get(ref, probe_health=False).is_external:
            raise BadInput(
                "an external engine is not ours to restart", hint="restart it where it runs"
            )
        record = self.stop(ref, timeout=stop_timeout)
        spec = dataclasses.replace(record.spec, port=record.port)
        fresh = self.spawn(spec, reuse=Reuse(record.id))
        if not wait:
            return fresh
        return self.wait_ready(fresh.id, timeout=timeout, on_progress=on_progress)

    # -- supervision (gateway/control/supervisor.py drives these; each is one state transition) --

    def start(
        self,
        spec: EngineSpec,
        *,
        wait: bool = True,
        timeout: float = 600.0,
        on_progress: ProgressCallback | None = None,
    ) -> EngineRecord:
        """Start an engine (and wait for it), or only register it when it is lazy.

        A lazy engine (`keep_alive` 0 and no wait) is recorded IDLE: it holds nothing and
        the gateway loads it on its first request.
        """
        if not wait and spec.keep_alive == 0:
            return self.register_idle(spec)
        record = self.spawn(spec)
        if not wait:
            return record
        return self.wait_ready(record.id, timeout=timeout, on_progress=on_progress)

    def register_idle(self, spec: EngineSpec) -> EngineRecord:
        """Record an engine as `idle` without starting it (no reservation, port preferred)."""
        runtime = validate_spec(spec)
        with self.store.transaction() as state:
            self.reconcile(state)
            record, _ = self._reserve(
                state, dataclasses.replace(spec, use_gpu=False), runtime, None, Status.IDLE
            )
            record.spec, record.cpu_cores = spec, []
            record.gpus, record.gpu_memory_gb = [], None
            state.release(record.id)
            return record

    def wake(self, engine_id: str, *, timeout: float = 600.0) -> EngineRecord:
        """Load an `idle` engine again: placed afresh, its old port when free; wait for it."""
        record = self._current(engine_id)
        reuse = Reuse(engine_id, port=record.port, only_if=frozenset({Status.IDLE}))
        self.spawn(record.spec, reuse=reuse)
        return self.wait_ready(engine_id, timeout=timeout)

    def unload(self, engine_id: str, *, timeout: float = 30.0) -> EngineRecord | None:
        """Stop a ready engine's processes but keep it registered as `idle` (keep_alive)."""
        return self._stop_record(
            engine_id,
            timeout=timeout,
            final_status=Status.IDLE,
            interim=Status.UNLOADING,
            only_if=PROBED,
        )

    def revive(self, engine_id: str, *, timeout: float = 600.0) -> EngineRecord | None:
        """Restart a `restarting` engine once its back-off is over (None if not due)."""
        with self.store.transaction() as state:
            record = state.engines.get(engine_id)
            now = time.time()
            if (
                record is None
                or record.status != Status.RESTARTING
                or record.orphans
                or (record.next_restart_at or 0) > now
            ):
                return None
            record.restarts += 1
            record.restart_times = [*record.restart_times, now]
            reuse = Reuse(
                engine_id, record.port, list(record.gpus), only_if=frozenset({Status.RESTARTING})
            )
            spec = record.spec
        try:
            self.spawn(spec, reuse=reuse)
        except SageError as exc:  # nothing started (a port or GPU went elsewhere): give up
            with self.store.transaction() as state:
                record = state.engines.get(engine_id)
                if record is not None and transition(record, Status.FAILED):
                    record.next_restart_at = None
                    record.error = f"restart failed: {exc.message}"
                    state.release(engine_id)
            raise
        return self.wait_ready(engine_id, timeout=timeout)

    def recycle(self, engine_id: str, reason: str, *, timeout: float = 5.0) -> EngineRecord | None:
        """Kill a hung engine and hand it to its restart policy (reservation kept)."""
        return self._stop_record(
            engine_id,
            timeout=timeout,
            final_status=Status.RESTARTING,
            error=reason,
            interim=Status.RESTARTING,
            only_if=PROBED,
        )

    def mark_unresponsive(self, engine_id: str, reason: str | None) -> None:
        """Record that generation probes fail (UNHEALTHY) or pass again (READY)."""
        with self.store.transaction() as state:
            record = state.engines.get(engine_id)
            if record is None or record.status not in PROBED:
                return
            if reason is None:
                if record.unresponsive_since is not None and transition(record, Status.READY):
                    record.unresponsive_since = None
                return
            if transition(record, Status.UNHEALTHY, reason=reason):
                record.error = reason
                record.unresponsive_since = record.unresponsive_since or time.time()

    def hold(self, ref: str, seconds: float) -> EngineRecord:
        """A lease: the scheduler never unloads the engine for `seconds` (0 ends it).

        For a batch job that must not find its model unloaded half-way. Exit 3 if
        unknown, 2 if not live or `seconds` is negative.
        """
        if seconds < 0:
            raise BadInput(f"lease of {seconds:g}s", hint="give a duration >= 0 (0 ends it)")
        with self.store.transaction() as state:
            self.reconcile(state)
            record = resolve_ref(state, ref)
            if not record.is_live:
                raise BadInput(
                    f"engine {record.id} is {record.status}: nothing to hold",
                    hint=f"start it first: `sage llm engine restart {record.id}`",
                )
            record.held_until = time.time() + seconds if seconds > 0 else None
            return record

    def mark_asleep(self, engine_id: str, resident_gib: float) -> bool:
        """vLLM slept: SLEEPING, and the ledger holds only `resident_gib` per GPU.

        False (nothing written) when the engine was stopped, or crashed, meanwhile: a
        sleep that answers late must not bring a stopped engine back.
        """
        with self.store.transaction() as state:
            record = state.engines.get(engine_id)
            if record is None or not transition(record, Status.SLEEPING, reason="slept"):
                return False
            reservation = state.reservations.get(engine_id)
            if reservation is not None:
                reservation.asleep_gib = min(resident_gib, reservation.gib_per_gpu)
            return True

    def reclaim(self, engine_id: str) -> bool:
        """Before a wake: WAKING, with the sleeping engine's full reservation taken back if
        it still fits (else ResourceUnavailable, and it stays asleep). False (nothing
        written) when it is no longer asleep: stopped, crashed or woken meanwhile."""
        from sagellm_cli.core.gpu import reservation_fits

        with self.store.transaction() as state:
            record = state.engines.get(engine_id)
            if record is None or record.status not in (Status.SLEEPING, Status.WAKING):
                return False
            reservation = state.reservations.get(engine_id)
            if reservation is not None and reservation.asleep_gib is not None:
                if not reservation_fits(state, reservation):
                    raise ResourceUnavailable(
                        f"not enough GPU memory to wake engine {engine_id}",
                        hint="unload another engine first",
                    )
                reservation.asleep_gib = None
            return transition(record, Status.WAKING, reason="wake")

    def mark_awake(self, engine_id: str, *, woke: bool = True) -> bool:
        """vLLM answered /wake_up: READY again, or with `woke` False (it refused) back to
        SLEEPING, its full reservation kept. False (nothing written) unless it is WAKING."""
        with self.store.transaction() as state:
            record = state.engines.get(engine_id)
            if record is None or record.status != Status.WAKING:
                return False
            return transition(record, Status.READY if woke else Status.SLEEPING)

    def prune(self) -> list[EngineRecord]:
        """Drop stopped and failed records (killing any leftover process) and their logs."""
        with self.store.transaction() as state:
            self.reconcile(state)
            dead = [r for r in state.engines.values() if not r.is_live]
        for record in dead:
            launcher_for(record.node).terminate(record, timeout=10.0)
        with self.store.transaction() as state:
            for record in dead:
                current = state.engines.get(record.id)
                if current is None or current.is_live:
                    continue
                del state.engines[record.id]
                state.release(record.id)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(record.log_path)
                launcher_for(record.node).cleanup(record, forget=True)
        return dead


def resolve_ref(state: State, ref: str) -> EngineRecord:
    """Find an engine by exact id, label, or unique id prefix."""
    if ref in state.engines:
        return state.engines[ref]
    by_label = [r for r in state.engines.values() if r.label == ref]
    live_by_label = [r for r in by_label if r.is_live]
    if len(live_by_label) == 1:
        return live_by_label[0]
    if by_label and not live_by_label:
        # Labels are unique among live engines only: of old records, the newest is meant.
        return max(by_label, key=lambda r: r.created_at)
    by_prefix = [r for r in state.engines.values() if len(ref) >= 3 and r.id.startswith(ref)]
    if len(by_prefix) == 1:
        return by_prefix[0]
    matches = by_label or by_prefix
    if matches:
        ids = ", ".join(r.id for r in matches)
        raise BadInput(f"{ref!r} matches several engines: {ids}", hint="use the full engine id")
    raise NotFound(f"no engine {ref!r}", hint="see `sage llm engine list --all`")


def _exit_code(launcher: Launcher, record: EngineRecord) -> int | None:
    """A dead engine's exit code. Its wrapper writes it just after the engine exits: a
    reconcile that sees the death first waits for it, briefly (restart policies use it)."""
    if record.pid is None or not launcher.on_this_machine:  # nothing ran, or a remote call each
        return launcher.exit_code(record)
    for _ in range(EXIT_CODE_POLLS):
        code = launcher.exit_code(record)
        if code is not None:
            return code
        time.sleep(0.05)
    return launcher.exit_code(record)


def _release(state: State, record: EngineRecord) -> None:
    """What an engine whose processes are gone gives back: its GPU reservation (unless a
    restart is due, which keeps it) and, once idle, its CPU cores."""
    if record.status != Status.RESTARTING:
        state.release(record.id)
    if record.status == Status.IDLE:
        record.cpu_cores = []


def _shares_gpu(a: EngineRecord, gpus: list[int]) -> bool:
    return bool(set(a.gpus) & set(gpus))


def _profiles(runtime: str, argv: list[str]) -> bool:
    """True if the engine sizes its KV cache from free-memory readings (vLLM without
    --kv-cache-memory-bytes): a neighbour that loads meanwhile corrupts them."""

    sized = any(a == KV_BYTES_FLAG or a.startswith(KV_BYTES_FLAG + "=") for a in argv)
    return runtime == VLLM and not sized


def _settled(record: EngineRecord) -> bool:
    """True once a loading engine no longer changes its memory much: vLLM logged its KV
    cache size (what follows, CUDA graphs, is within the overhead table's allowance)."""
    return record.status == Status.STARTING and logs.kv_cache_sized(record.log_path)


def _blocks(other: EngineRecord, profiles: bool, ahead: bool, mode: str) -> bool:
    """True if `other`, loading on a shared GPU, must finish first (see _wait_turn)."""
    from sagellm_cli.core.gpu.kv_budget import SERIAL

    if other.status == Status.QUEUED:
        return ahead and (mode == SERIAL or profiles or _profiles(other.runtime, other.command))
    if other.status != Status.STARTING:
        return False
    if mode == SERIAL:
        return True
    return (profiles or _profiles(other.runtime, other.command)) and not _settled(other)


def _must_queue(
    state: State, spec: EngineSpec, runtime: str, placement: Placement | None, reuse_id
) -> bool:
    """True if the new engine must wait for another one loading on its GPUs."""
    from sagellm_cli.core.gpu.kv_budget import start_mode

    if placement is None or placement.mock:
        return False
    kv_known = placement.kv_cache_bytes is not None or spec.kv_cache_gb is not None
    profiles = _profiles(runtime, ([KV_BYTES_FLAG] if kv_known else []) + spec.extra_args)
    mode = start_mode()
    return any(
        r.id != reuse_id and _shares_gpu(r, placement.gpus) and _blocks(r, profiles, True, mode)
        for r in state.engines.values()
    )


def _loading_before(state: State, record: EngineRecord) -> bool:
    """True while an engine on the same GPUs must load first: ahead of `record` in the
    queue, or still loading in a way that disturbs it (or that it would disturb)."""
    from sagellm_cli.core.gpu.kv_budget import start_mode

    mode = start_mode()
    profiles = _profiles(record.runtime, record.command)
    return any(
        r.id != record.id
        and _shares_gpu(r, record.gpus)
        and _blocks(r, profiles, (r.created_at, r.id) < (record.created_at, record.id), mode)
        for r in state.engines.values()
    )


def _choose_port(launcher, spec: EngineSpec, taken: set[int], preferred: int | None) -> int:
    """The spec's port (exit 4 if taken), else the preferred one when free, else any free one."""
    if spec.port is not None:
        launcher.check_port(spec.host, spec.port, taken)
        return spec.port
    if preferred is not None:
        try:
            launcher.check_port(spec.host, preferred, taken)
            return preferred
        except ResourceUnavailable:
            pass
    return launcher.allocate_port(spec.host, taken)


def _place(launcher, spec, runtime, state, live, reuse: Reuse | None):
    """The launcher's placement, trying the GPUs a restarted engine had first."""
    if reuse and reuse.gpus and spec.gpus is None:
        try:
            return launcher.place(dataclasses.replace(spec, gpus=reuse.gpus), runtime, state, live)
        except (BadInput, ResourceUnavailable):
            pass  # they no longer fit: place it afresh
    return launcher.place(spec, runtime, state, live)


def new_engine_id(state: State) -> str:
    """A fresh random engine id (8 hex digits) that no record has."""
    while True:
        candidate = os.urandom(4).hex()
        if candidate not in state.engines:
            return candidate


def check_label_free(live: Iterable[EngineRecord], label: str | None) -> None:
    """BadInput (exit 2) if a live engine already has `label` (labels name one engine)."""
    if label and any(r.label == label for r in live):
        raise BadInput(
            f"label {label!r} is already used by a running engine",
            hint="choose another --label or stop that engine first",
        )


def _probe_ready(record: EngineRecord, timeout: float = 2.0, *, generate: bool = True):
    """A `probe.ReadyCheck`: a starting engine must answer one real request to be ready."""
    from sagellm_cli.core.engines import (
        probe,  # http.client costs start-up time: only when a probe is due
    )

    return probe.check_ready(
        record.url, record.kind, record.served_model_name, timeout, generate=generate
    )
