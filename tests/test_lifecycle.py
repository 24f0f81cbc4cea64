"""The engine state machine (core/lifecycle.py): the transition table and its one writer.

Pure tests: records in memory and a state file in tmp_path; no process is started.
"""

from __future__ import annotations

import itertools
import json
import logging

import pytest

from sagellm_cli.cli.common import STATUS_COLORS
from sagellm_cli.core.engines.manager import EngineManager
from sagellm_cli.core.errors import StateCorrupted
from sagellm_cli.core.lifecycle import (
    INITIAL,
    LIVE,
    TRANSITIONS,
    IllegalTransition,
    Status,
    allowed,
    require,
    transition,
)
from sagellm_cli.core.records import EngineRecord, GpuReservation
from sagellm_cli.core.state import StateStore

ALL = list(Status)
ILLEGAL = [(a, b) for a, b in itertools.product(ALL, ALL) if a != b and b not in TRANSITIONS[a]]
# Sorted: TRANSITIONS holds sets, and every test worker must collect the same order.
LEGAL = [(a, b) for a in ALL for b in sorted(TRANSITIONS[a])]


def _record(status: Status) -> EngineRecord:
    return EngineRecord(
        id="e1", kind="llm", runtime="vllm", model="m", served_model_name="m",
        host="127.0.0.1", port=8000, status=status,
    )  # fmt: skip


def test_the_table_names_every_status_and_only_statuses():
    assert set(TRANSITIONS) == set(Status)
    for targets in TRANSITIONS.values():
        assert all(isinstance(t, Status) for t in targets)
    assert set(Status) >= INITIAL
    assert set(Status) - {Status.STOPPED, Status.FAILED} == LIVE


def test_every_live_engine_can_be_stopped_and_nothing_leaves_stopped_but_a_start():
    for status in LIVE:
        assert allowed(status, Status.STOPPING) or allowed(status, Status.STOPPED), status
    assert TRANSITIONS[Status.STOPPED] == {Status.QUEUED, Status.STARTING}
    assert not allowed(Status.STOPPED, Status.SLEEPING)  # the mark_asleep bug
    assert not allowed(Status.STOPPED, Status.READY)
    assert not allowed(Status.STOPPING, Status.SLEEPING)
    assert not allowed(Status.STOPPED, Status.RESTARTING)


@pytest.mark.parametrize(("current", "new"), ILLEGAL, ids=lambda s: str(s))
def test_every_illegal_change_is_refused_logged_and_writes_nothing(current, new, caplog):
    record = _record(current)
    before = record.to_state()
    with caplog.at_level(logging.WARNING, logger="sagellm.lifecycle"):
        assert transition(record, new, reason="test") is False
    assert record.to_state() == before
    assert f"refused {current} -> {new}" in caplog.text
    with pytest.raises(IllegalTransition):
        require(record, new)
    assert record.to_state() == before


@pytest.mark.parametrize(("current", "new"), LEGAL, ids=lambda s: str(s))
def test_every_allowed_change_is_made(current, new):
    record = _record(current)
    assert transition(record, new) is True
    assert record.status is new


def test_the_same_status_again_is_a_no_op_that_is_allowed():
    for status in Status:
        record = _record(status)
        assert transition(record, status) and record.status is status


def test_statuses_are_the_strings_the_state_file_always_had(tmp_path):
    """Old state files load (their strings are Status values), and files keep strings."""
    path = tmp_path / "state.json"
    old = {
        "version": 1,
        "engines": {
            s.value: {
                "id": s.value, "kind": "llm", "runtime": "vllm", "model": "m",
                "served_model_name": "m", "host": "127.0.0.1", "port": 8000 + i,
                "status": s.value,
            }
            for i, s in enumerate(Status)
        },
    }  # fmt: skip
    path.write_text(json.dumps(old))
    state = StateStore(path).read()
    for key, record in state.engines.items():
        assert record.status is Status(key) and record.status == key
        assert f"{record.status}" == key  # shown as the plain word
    with StateStore(path).transaction() as state:
        state.engines["ready"].error = "x"  # force a rewrite
    written = json.loads(path.read_text())
    assert {k: v["status"] for k, v in written["engines"].items()} == {
        s.value: s.value for s in Status
    }


def test_an_unknown_status_is_a_corrupt_state_file(tmp_path):
    path = tmp_path / "state.json"
    bad = {"id": "e1", "kind": "llm", "runtime": "vllm", "model": "m",
           "served_model_name": "m", "host": "h", "port": 1, "status": "zombie"}  # fmt: skip
    path.write_text(json.dumps({"version": 1, "engines": {"e1": bad}}))
    with pytest.raises(StateCorrupted, match="status"):
        StateStore(path).read()


def test_a_sleep_that_answers_after_stop_changes_nothing_in_the_state_file(tmp_path, caplog):
    """The writer's side of the mark_asleep bug: a stopped engine stays stopped, its
    reservation stays released, and the file is not even rewritten."""
    path = tmp_path / "state.json"
    store = StateStore(path)
    with store.transaction() as state:
        state.engines["e1"] = _record(Status.STOPPED)
    before = path.read_bytes()
    mtime = store.mtime_ns()
    with caplog.at_level(logging.WARNING, logger="sagellm.lifecycle"):
        assert EngineManager(store).mark_asleep("e1", 1.0) is False
        assert EngineManager(store).mark_awake("e1") is False
        assert EngineManager(store).reclaim("e1") is False
    assert path.read_bytes() == before and store.mtime_ns() == mtime
    assert "refused stopped -> sleeping" in caplog.text


def test_a_sleep_of_a_ready_engine_is_recorded_with_its_smaller_reservation(tmp_path, monkeypatch):
    monkeypatch.setenv("SAGELLM_MOCK_GPUS", "1x80")  # the ledger's GPU for the wake's room check
    store = StateStore(tmp_path / "state.json")
    with store.transaction() as state:
        state.engines["e1"] = _record(Status.READY)
        state.reservations["e1"] = GpuReservation("e1", [0], 20.0, mock=True)
    manager = EngineManager(store)
    assert manager.mark_asleep("e1", 1.0) is True
    state = store.read()
    assert state.engines["e1"].status is Status.SLEEPING
    assert state.reservations["e1"].held_gib == 1.0
    assert manager.reclaim("e1") is True  # SLEEPING -> WAKING, the full reservation back
    state = store.read()
    assert state.engines["e1"].status is Status.WAKING
    assert state.reservations["e1"].held_gib == 20.0
    assert manager.mark_awake("e1") is True
    assert store.read().engines["e1"].status is Status.READY


def test_every_status_has_one_colour():
    assert set(STATUS_COLORS) == set(Status)
