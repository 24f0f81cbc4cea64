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

from sagellm_cli.core.errors import BadInput, ExitCode, OperationFailed, SageError
from sagellm_cli.core.models import EngineRecord
from sagellm_cli.core.presets.plan import KEEP, REPLACE, RESTART, PresetPlan

if TYPE_CHECKING:
    from sagellm_cli.core.engines import EngineManager

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
    entry = {
        "file": plan.file,
        "description": plan.description,
        "applied_at": time.time(),
        "status": status,
        "engines": labels,
    }
    with manager.store.transaction() as state:
        # A new dict, not an update in place: State.to_dict() shares `presets`, so an
        # in-place change would not be seen as a change and never written.
        state.presets = {**state.presets, plan.preset: entry}


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
    began = time.monotonic()
    result = ApplyResult(preset=plan.preset)

    def emit(label: str, status: str, line: str = "", engine_id: str | None = None, at=None):
        if on_event is not None:
            elapsed = time.monotonic() - (at if at is not None else began)
            on_event(EngineEvent(label, status, elapsed, line, engine_id))

    current = {r.id: r for r in manager.list(include_all=True, probe_health=False)}
    for item in plan.engines:
        if item.action == KEEP and item.existing_id in current:
            result.kept.append(current[item.existing_id])
            emit(item.label, "kept", engine_id=item.existing_id)
    if plan.noop:
        result.noop = True
        result.elapsed = time.monotonic() - began
        return result
    if plan.remove and not confirm_remove:
        names = ", ".join(f"{r.label} ({r.id})" for r in plan.remove)
        raise BadInput(
            f"applying {plan.preset!r} would stop engines no longer in the file: {names}",
            hint="confirm with --yes",
        )

    # Engines leaving the preset (or changing) are stopped first: they free ports and GPUs.
    for record in plan.remove:
        emit(record.label or record.id, "stopping", engine_id=record.id)
        manager.stop(record.id, timeout=STOP_TIMEOUT_S)
        result.removed.append(record)
    for item in plan.engines:
        if item.action == REPLACE and item.existing_id:
            emit(item.label, "stopping", engine_id=item.existing_id)
            manager.stop(item.existing_id, timeout=STOP_TIMEOUT_S)

    started: dict[str, str] = {}  # label -> engine id, in start order
    ready: dict[str, EngineRecord] = {}
    done: queue.Queue[tuple[str, EngineRecord | None, BaseException | None]] = queue.Queue()
    waiters: list[threading.Thread] = []

    def wait_one(label: str, engine_id: str, t0: float) -> None:
        def progress(p) -> None:
            emit(label, p.status, p.last_log_line, engine_id, at=t0)

        try:
            record = manager.wait_ready(engine_id, timeout=timeout, on_progress=progress)
            done.put((label, record, None))
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread
            done.put((label, None, exc))

    def fail(label: str, engine_id: str | None, exc: BaseException) -> None:
        if isinstance(exc, SageError):
            failure = EngineFailure(label, engine_id, exc.message, exc.details)
        else:
            failure = EngineFailure(label, engine_id, f"{type(exc).__name__}: {exc}")
        if engine_id and not failure.log_tail:
            failure.log_tail = "\n".join(manager.log_tail(engine_id)) or None
        result.failures.append(failure)
        emit(label, "failed", failure.message, engine_id)
        if rollback:
            raise _Abort

    try:
        for item in plan.to_start:
            emit(item.label, "spawning")
            spec = dataclasses.replace(item.spec, port=item.port)
            reuse = item.existing_id if item.action == RESTART else None
            t0 = time.monotonic()
            try:
                record = manager.spawn(spec, reuse_id=reuse)
            except Exception as exc:  # noqa: BLE001 - any spawn error rolls back
                fail(item.label, None, exc)
                continue
            started[item.label] = record.id
            emit(item.label, "starting", "", record.id, at=t0)
            thread = threading.Thread(
                target=wait_one, args=(item.label, record.id, t0), daemon=True
            )
            thread.start()
            waiters.append(thread)
        pending = len(waiters)
        while pending:
            try:
                label, record, exc = done.get(timeout=0.25)
            except queue.Empty:
                continue
            pending -= 1
            if exc is not None:
                fail(label, started.get(label), exc)
            else:
                ready[label] = record
                emit(label, "ready", "", record.id)
    except _Abort:
        pass
    except KeyboardInterrupt:
        result.interrupted = True
    except Exception as exc:  # noqa: BLE001 - never leave half a preset behind
        result.failures.append(EngineFailure("-", None, f"internal error: {exc!r}"))

    if result.ok:
        result.started = [ready[label] for label in started]
        labels = {r.label: r.id for r in result.kept + result.started}
        _record_preset(manager, plan, labels, "up")
        result.elapsed = time.monotonic() - began
        return result

    # Roll back: every engine this apply started, or with --no-rollback the unhealthy ones.
    if rollback:
        to_stop = list(started.values())
    else:
        to_stop = [i for label, i in started.items() if label not in ready]
    failed_labels = {f.label for f in result.failures}
    for label, engine_id in started.items():
        if engine_id in to_stop and label not in failed_labels:
            emit(label, "stopping", "", engine_id)
    problems = _stop_many(manager, to_stop)
    for thread in waiters:
        thread.join(timeout=5.0)
    for label, engine_id in started.items():
        if engine_id in to_stop and label not in failed_labels:
            emit(label, "stopped", "", engine_id)
    result.rolled_back = [i for i in to_stop if rollback]
    kept_up = {label: i for label, i in started.items() if i not in to_stop}
    result.started = [ready[label] for label in kept_up]
    if kept_up or result.kept:
        labels = {r.label: r.id for r in result.kept} | kept_up
        _record_preset(manager, plan, labels, "partial")
    result.elapsed = time.monotonic() - began
    cleanup = f"; could not stop: {'; '.join(problems)}" if problems else ""
    if result.interrupted:
        raise ApplyInterrupted(
            f"interrupted: stopped {len(to_stop)} engine(s) this apply of "
            f"{plan.preset!r} started{cleanup}"
        )
    first = result.failures[0]
    what = (
        f"rolled back {len(to_stop)} engine(s) this apply started"
        if rollback
        else f"kept {len(kept_up)} healthy engine(s) (--no-rollback)"
    )
    details = None
    if first.log_tail:
        who = first.engine_id or first.label
        details = f"--- last lines of the log of {who} ({first.label}) ---\n{first.log_tail}"
    raise ApplyFailed(
        f"preset {plan.preset!r}: engine {first.label!r} failed: {first.message}; {what}{cleanup}",
        result,
        hint=f"see `sage llm engine logs {first.engine_id}`" if first.engine_id else None,
        details=details,
    )


def down(preset: str, manager: EngineManager) -> list[EngineRecord]:
    """Stop every engine of `preset` and forget it as applied. Idempotent."""
    stopped = manager.stop_all(timeout=STOP_TIMEOUT_S, preset=preset)
    if preset in manager.store.read().presets:
        with manager.store.transaction() as state:
            state.presets = {k: v for k, v in state.presets.items() if k != preset}
    return stopped
