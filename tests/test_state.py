"""The state file: locking, atomic writes, permissions, corruption handling."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat

import pytest

from sagellm_cli.core.errors import StateCorrupted
from sagellm_cli.core.records import AppliedPreset, EngineRecord
from sagellm_cli.core.state import StateStore


def _record(engine_id: str, port: int) -> EngineRecord:
    return EngineRecord(
        id=engine_id,
        kind="llm",
        runtime="vllm",
        model="m",
        served_model_name="m",
        host="127.0.0.1",
        port=port,
        status="stopped",
    )


def test_state_dir_precedence(monkeypatch, tmp_path):
    from sagellm_cli.core import paths

    monkeypatch.delenv("SAGELLM_HOME", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert paths.state_dir() == tmp_path / "xdg" / "sagellm"
    monkeypatch.setenv("SAGELLM_HOME", str(tmp_path / "home"))
    assert paths.state_file() == tmp_path / "home" / "state.json"
    monkeypatch.delenv("SAGELLM_HOME")
    monkeypatch.delenv("XDG_STATE_HOME")
    assert str(paths.state_dir()).endswith(".local/state/sagellm")


def test_write_is_private_and_round_trips(home):
    store = StateStore()
    with store.transaction() as state:
        state.engines["a"] = _record("a", 9000)
    mode = stat.S_IMODE(os.stat(store.path).st_mode)
    assert mode == 0o600
    data = json.loads(store.path.read_text())
    assert data["engines"]["a"]["url"] == "http://127.0.0.1:9000"
    assert store.read().engines["a"].port == 9000
    assert not [p for p in store.path.parent.iterdir() if p.name.startswith(".state-")]


@pytest.mark.parametrize(
    "content",
    ["{not json", "[]", '{"version": 99}', '{"engines": {"x": {"id": "x"}}}'],
)
def test_corrupt_file_is_reported_and_left_untouched(home, content):
    store = StateStore()
    store.path.parent.mkdir(parents=True, exist_ok=True)
    store.path.write_text(content)
    with pytest.raises(StateCorrupted) as info, store.transaction():
        pass
    assert str(store.path) in info.value.message
    assert store.path.read_text() == content


def _add_records(home: str, worker: int, count: int) -> None:
    os.environ["SAGELLM_HOME"] = home
    store = StateStore()
    for i in range(count):
        with store.transaction() as state:
            state.engines[f"{worker}-{i}"] = _record(f"{worker}-{i}", 10000 + worker * 100 + i)


def test_concurrent_writers_lose_nothing(home):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_add_records, args=(str(home), w, 15)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(StateStore().read().engines) == 60


def test_in_place_edits_of_nested_sections_are_written(home):
    store = StateStore()
    with store.transaction() as state:
        state.presets["demo"] = AppliedPreset()
    with store.transaction() as state:
        state.presets["demo"].engines["chat"] = "abc123"
    assert store.read().presets["demo"].engines == {"chat": "abc123"}
