"""Applying a plan: start every engine at once, wait concurrently, roll back on failure.

Only engines that *this* apply started are ever rolled back; engines kept from an
earlier apply and engines of other presets are never touched by a failure.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sagellm_cli.core.engines.manager import Reuse
from sagellm_cli.core.errors import BadInput, ExitCode, OperationFailed, SageError
from sagellm_cli.core.lifecycle import Status
from sagellm_cli.core.presets.plan import KEEP, REPLACE, RESTART, PresetPlan
from sagellm_cli.core.records import AppliedPreset, EngineRecord

if TYPE_CHECKING:
    from sagellm_cli.core.engines.manager import EngineManager

STOP_TIMEOUT_S = 30.0


@dataclass
class EngineEvent:
    """Progress of one engine during an apply, for live displays."""

    label: str
    status: str  # kept, spawning, starting, ready, failed, stopping, stopped
    elapsed: float
    last_log_line: str = ""
    engine_id: str | None = None


EventCallback = Callable[[EngineEvent], None]


@dataclass
class EngineFailure:
    """Why one engine did not come up."""

    label: str
    engine_id: str | None
    message: str
    log_tail: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ApplyResult:
    """What an apply did."""

    preset: str
    noop: bool = False
    started: list[EngineRecord] = field(default_factory=list)
    kept: list[EngineRecord] = field(default_factory=list)
    removed: list[EngineRecord] = field(default_factory=list)
    failures: list[EngineFailure] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    interrupted: bool = False
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures and not self.interrupted

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "ok": self.ok,
            "noop": self.noop,
            "elapsed_s": round(self.elapsed, 2),
            "started": [r.to_dict() for r in self.started],
            "kept": [r.to_dict() for r in self.kept],
            "removed": [r.id for r in self.removed],
            "failures": [f.to_dict() for f in self.failures],
            "rolled_back": self.rolled_back,
            "interrupted": self.interrupted,
        }


class ApplyInterrupted(SageError):
    """Ctrl-C during an apply: what it started was stopped (exit 130)."""

    exit_code = ExitCode.INTERRUPTED


class ApplyFailed(OperationFailed):
    """An engine failed; carries the result for `--json` output."""

    def __init__(self, message: str, result: ApplyResult, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.result = result


class _Abort(Exception):
    """Stop starting and waiting: an engine failed and rollback is on."""


def _stop_quietly(manager: EngineManager, engine_id: str) -> str | None:
    """Stop one engine; return a problem description instead of raising."""
    try:
        manager.stop(engine_id, timeout=STOP_TIMEOUT_S)
    except SageError as exc:
        return f"{engine_id}: {exc.one_line()}"
    return None


def _stop_many(manager: EngineManager, engine_ids: list[str]) -> list[str]:
    """Stop engines concurrently, shielded from a second Ctrl-C; return problems."""
    if not engine_ids:
        return []
    pool = ThreadPoolExecutor(max_workers=len(engine_ids))
    futures = [pool.submit(_stop_quietly, manager, i) for i in engine_ids]
    problems: list[str] = []
    for future in futures:
        while True:
            try:
                problem = future.result()
                break
            except KeyboardInterrupt:
                continue  # finish cleaning up; a half-done rollback is worse
        if problem:
            problems.append(problem)
    pool.shutdown(wait=True)
    return problems


def _record_preset(manager: EngineManager, plan: PresetPlan, labels: dict[str, str], status: str):
    entry = AppliedPreset(
        file=plan.file,
        description=plan.description,
        applied_at=time.time(),
        status=status,
        engines=labels,
    )
    with manager.store.transaction() as state:
        state.presets[plan.preset] = entry


def apply_plan(
    plan: PresetPlan,
    manager: EngineManager,
    *,
    timeout: float = 600.0,
    rollback: bool = True,
    confirm_remove: bool = False,
    on_event: EventCallback | None = None,
) -> ApplyResult:
    """Bring the preset up as planned.

    Raises BadInput when engines would be removed without `confirm_remove`,
    ApplyFailed (exit 1) when an engine fails, ApplyInterrupted (exit 130) on Ctrl-C.
    """
    plan.check_startable()
    run = _Apply(plan, manager, timeout=timeout, rollback=rollback, on_event=on_event)
    run.note_kept()
    if plan.noop:
        return run.finish_noop()
    if plan.remove and not confirm_remove:
        names = ", ".join(f"{r.label} ({r.id})" for r in plan.remove)
        raise BadInput(
            f"applying {plan.preset!r} would stop engines no longer in the file: {names}",
            hint="confirm with --yes",
        )
    run.stop_outgoing()
    try:
        run.start_all()
        run.wait_all()
    except _Abort:
        pass
    except KeyboardInterrupt:
        run.result.interrupted = True
    except Exception as exc:  # noqa: BLE001 - never leave half a preset behind
        run.result.failures.append(EngineFailure("-", None, f"internal error: {exc!r}"))
    if run.result.ok:
        return run.finish_up()
    raise run.roll_back()


class _Apply:
    """One apply in progress: what it started, what is ready, and how to undo it."""

    def __init__(self, plan, manager, *, timeout, rollback, on_event):
        self.plan, self.manager = plan, manager
        self.timeout, self.rollback, self.on_event = timeout, rollback, on_event
        self.began = time.monotonic()
        self.result = ApplyResult(preset=plan.preset)
        self.started: dict[str, str] = {}  # label -> engine id, in start order
        self.ready: dict[str, EngineRecord] = {}
        self.done: queue.Queue[tuple[str, EngineRecord | None, BaseException | None]] = (
            queue.Queue()
        )
        self.waiters: list[threading.Thread] = []

    def emit(self, label, status, line="", engine_id=None, at=None) -> None:
        if self.on_event is not None:
            elapsed = time.monotonic() - (at if at is not None else self.began)
            self.on_event(EngineEvent(label, status, elapsed, line, engine_id))

    # -- steps -------------------------------------------------------------------

    def note_kept(self) -> None:
        """Engines of the plan that are already up as wanted."""
        current = {r.id: r for r in self.manager.list(include_all=True, probe_health=False)}
        for item in self.plan.engines:
            if item.action == KEEP and item.existing_id in current:
                self.result.kept.append(current[item.existing_id])
                self.emit(item.label, "kept", engine_id=item.existing_id)

    def stop_outgoing(self) -> None:
        """Engines leaving the preset (or changing) stop first: they free ports and GPUs."""
        for record in self.plan.remove:
            self.emit(record.label or record.id, Status.STOPPING, engine_id=record.id)
            self.manager.stop(record.id, timeout=STOP_TIMEOUT_S)
            self.result.removed.append(record)
        for item in self.plan.engines:
            if item.action == REPLACE and item.existing_id:
                self.emit(item.label, Status.STOPPING, engine_id=item.existing_id)
                self.manager.stop(item.existing_id, timeout=STOP_TIMEOUT_S)

    def start_all(self) -> None:
        """Spawn every engine at once; one thread per engine waits for its readiness."""
        for item in self.plan.to_start:
            self.emit(item.label, "spawning")
            spec = dataclasses.replace(item.spec, port=item.port)
            reuse = Reuse(item.existing_id) if item.action == RESTART and item.existing_id else None
            t0 = time.monotonic()
            try:
                if item.url is not None:
                    record = _register(self.manager, item)
                else:
                    record = self.manager.spawn(spec, reuse=reuse)
            except Exception as exc:  # noqa: BLE001 - any spawn error rolls back
                self.fail(item.label, None, exc)
                continue
            self.started[item.label] = record.id
            self.emit(item.label, Status.STARTING, "", record.id, at=t0)
            if item.url is not None:  # registered ready: nothing to wait for
                waiter, args = self.done.put, ((item.label, record, None),)
            else:
                waiter, args = self._wait_one, (item.label, record.id, t0)
            thread = threading.Thread(target=waiter, args=args, daemon=True)
            thread.start()
            self.waiters.append(thread)

    def _wait_one(self, label: str, engine_id: str, t0: float) -> None:
        def progress(p) -> None:
            self.emit(label, p.status, p.last_log_line, engine_id, at=t0)

        try:
            record = self.manager.wait_ready(engine_id, timeout=self.timeout, on_progress=progress)
            check_reservation_kept(self.manager, engine_id)
            self.done.put((label, record, None))
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread
            self.done.put((label, None, exc))

    def wait_all(self) -> None:
        """Collect the waiters' outcomes as they come (Ctrl-C stays responsive)."""
        pending = len(self.waiters)
        while pending:
            try:
                label, record, exc = self.done.get(timeout=0.25)
            except queue.Empty:
                continue
            pending -= 1
            if exc is not None:
                self.fail(label, self.started.get(label), exc)
            else:
                self.ready[label] = record
                self.emit(label, Status.READY, "", record.id)

    def fail(self, label: str, engine_id: str | None, exc: BaseException) -> None:
        """Record a failed engine; with rollback on, stop starting and waiting."""
        if isinstance(exc, SageError):
            failure = EngineFailure(label, engine_id, exc.message, exc.details)
        else:
            failure = EngineFailure(label, engine_id, f"{type(exc).__name__}: {exc}")
        if engine_id and not failure.log_tail:
            cause, tail = self.manager.failure_report(engine_id)
            if cause is None or cause not in failure.message:  # else the message says it
                failure.log_tail = "\n".join(tail) or None
        self.result.failures.append(failure)
        self.emit(label, Status.FAILED, failure.message, engine_id)
        if self.rollback:
            raise _Abort

    # -- endings -----------------------------------------------------------------

    def finish_noop(self) -> ApplyResult:
        self.result.noop = True
        self.result.elapsed = time.monotonic() - self.began
        return self.result

    def finish_up(self) -> ApplyResult:
        result = self.result
        result.started = [self.ready[label] for label in self.started]
        labels = {r.label: r.id for r in result.kept + result.started}
        _record_preset(self.manager, self.plan, labels, "up")
        result.elapsed = time.monotonic() - self.began
        return result

    def roll_back(self) -> SageError:
        """Stop what this apply started (with --no-rollback, only the unhealthy); return the
        ApplyFailed or ApplyInterrupted to raise."""
        result = self.result
        if self.rollback:
            to_stop = list(self.started.values())
        else:
            to_stop = [i for label, i in self.started.items() if label not in self.ready]
        failed = {f.label for f in result.failures}
        quietly_stopped = [
            (label, i) for label, i in self.started.items() if i in to_stop and label not in failed
        ]
        for label, engine_id in quietly_stopped:
            self.emit(label, Status.STOPPING, "", engine_id)
        problems = _stop_many(self.manager, to_stop)
        for thread in self.waiters:
            thread.join(timeout=5.0)
        for label, engine_id in quietly_stopped:
            self.emit(label, Status.STOPPED, "", engine_id)
        result.rolled_back = to_stop if self.rollback else []
        kept_up = {label: i for label, i in self.started.items() if i not in to_stop}
        result.started = [self.ready[label] for label in kept_up]
        if kept_up or result.kept:
            labels = {r.label: r.id for r in result.kept} | kept_up
            _record_preset(self.manager, self.plan, labels, "partial")
        result.elapsed = time.monotonic() - self.began
        return self._error(len(to_stop), len(kept_up), problems)

    def _error(self, stopped: int, kept_up: int, problems: list[str]) -> SageError:
        preset = self.plan.preset
        cleanup = f"; could not stop: {'; '.join(problems)}" if problems else ""
        if self.result.interrupted:
            return ApplyInterrupted(
                f"interrupted: stopped {stopped} engine(s) this apply of {preset!r} "
                f"started{cleanup}"
            )
        first = self.result.failures[0]
        what = (
            f"rolled back {stopped} engine(s) this apply started"
            if self.rollback
            else f"kept {kept_up} healthy engine(s) (--no-rollback)"
        )
        details = None
        if first.log_tail:
            who = first.engine_id or first.label
            details = f"--- last lines of the log of {who} ({first.label}) ---\n{first.log_tail}"
        return ApplyFailed(
            f"preset {preset!r}: engine {first.label!r} failed: {first.message}; {what}{cleanup}",
            self.result,
            hint=f"see `sage llm engine logs {first.engine_id}`" if first.engine_id else None,
            details=details,
        )


def check_reservation_kept(manager: EngineManager, engine_id: str) -> None:
    """OperationFailed if the ledger marks the ready engine as over its GPU reservation
    (wait_ready compared it with NVML): a silent overshoot would starve its neighbours."""
    from sagellm_cli.core.gpu.overuse import from_ledger

    over = from_ledger(manager.store.read().reservations.get(engine_id))
    if over is not None:
        raise OperationFailed(
            over.message(),
            hint="raise its gpu_memory_gb, or apply with SAGELLM_GPU_START_MODE=pipeline "
            "(vLLM then sizes its KV cache by profiling)",
        )


def down(preset: str, manager: EngineManager) -> list[EngineRecord]:
    """Stop every engine of `preset` and forget it as applied. Idempotent."""
    stopped = manager.stop_all(timeout=STOP_TIMEOUT_S, preset=preset)
    if preset in manager.store.read().presets:
        with manager.store.transaction() as state:
            state.presets.pop(preset, None)
    return stopped


def _register(manager: EngineManager, item) -> EngineRecord:
    """An external engine of the preset (`url:`): registered, after its /v1/models check."""
    from sagellm_cli.core.engines.external import Registration, register

    spec = item.spec
    registration = Registration(
        item.url, spec.model or None, spec.kind, spec.label, spec.role, spec.max_inflight,
        spec.cost_per_1k_tokens,
    )  # fmt: skip
    return register(manager, registration, preset=spec.preset, preset_engine=spec.preset_engine)
