"""Races between `engine stop`, crashes and the supervisor: none may bring a stopped engine
back or leave a GPU reservation behind (issue 20, docs/lifecycle.md).

The engine is a FAKE, on purpose: vLLM's sleep mode is CUDA-only, so on a CPU runner no
real engine can sleep. The stand-in has the two halves of an engine the lifecycle sees:
- a real process group (a sleeping Python), spawned by the local launcher exactly as an
  engine is, which `engine stop` terminates and a test kills to simulate a crash;
- its HTTP API, `SleepyEngine` (tests/fakes.py: FakeUpstream plus vLLM's `/sleep` and
  `/wake_up`), in a thread of the test, so that it can answer a held `/sleep` or
  `/wake_up` *after* the process was stopped: the late answer the races are about. The
  record routes to it by URL; its own port is a free one that nothing binds.
GPU reservations are on a mock GPU (SAGELLM_MOCK_GPUS=1x80).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time

import httpx
import psutil
import pytest
from conftest import sage, wait_for
from fakes import SleepyEngine
from test_gateway_support import add_engine_record, free_port, inprocess_gateway, running_gateway

from sagellm_cli.core.engines.manager import EngineManager, Reuse
from sagellm_cli.core.errors import OperationFailed
from sagellm_cli.core.launchers.base import launcher_for
from sagellm_cli.core.lifecycle import Status
from sagellm_cli.core.records import EngineSpec, GatewayRecord, GpuReservation
from sagellm_cli.core.state import StateStore

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
GIB = 20.0


@pytest.fixture
def mock_gpu(monkeypatch):
    monkeypatch.setenv("SAGELLM_MOCK_GPUS", "1x80")


@contextlib.contextmanager
def stand_in(
    home, fake: SleepyEngine, status: Status, *, engine_id="race0001", name="fake", **spec
):
    """A stand-in engine (see the module docstring) recorded with `status` and a 20 GiB
    reservation on mock GPU 0 (asleep: 1 GiB). Its process group is always killed."""
    home.mkdir(parents=True, exist_ok=True)
    handle = launcher_for("local").spawn(
        engine_id, [sys.executable, "-c", "import time; time.sleep(600)"], dict(os.environ),
        home / f"{engine_id}.log",
    )  # fmt: skip
    try:
        began = time.time() - 5
        has_process = status not in (Status.RESTARTING, Status.IDLE)
        add_engine_record(
            home, engine_id, free_port(), handle.pid if has_process else None,
            pgid=handle.pgid if has_process else None,
            pid_create_time=psutil.Process(handle.pid).create_time() if has_process else None,
            started_at=began, created_at=began, status=status, base_url=fake.url,
            gpus=[0], gpu_memory_gb=GIB,
            name=name, spec=EngineSpec(model="/fake/fake", served_model_name=name, **spec),
        )  # fmt: skip
        with StateStore(home / "state.json").transaction() as state:
            state.reservations[engine_id] = GpuReservation(
                engine_id, [0], GIB, mock=True,
                asleep_gib=1.0 if status == Status.SLEEPING else None,
            )  # fmt: skip
        yield engine_id
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(handle.pgid, signal.SIGKILL)


def _state(home):
    return StateStore(home / "state.json").read()


def _record_us_as_the_gateway(home) -> None:
    """Make this test process the recorded gateway, so its in-process supervisor acts."""
    me = psutil.Process()
    with StateStore(home / "state.json").transaction() as state:
        state.gateway = GatewayRecord(
            pid=me.pid, create_time=me.create_time(), host="127.0.0.1", port=1,
            url="http://127.0.0.1:1",
        )  # fmt: skip


async def _until(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _assert_stopped_and_released(home, engine_id: str) -> None:
    state = _state(home)
    assert state.engines[engine_id].status == Status.STOPPED
    assert engine_id not in state.reservations


GATEWAY = {"supervise_interval_s": 0.1, "health_interval_s": 0.2, "probe_interval_s": 0}


def test_stop_during_sleep(home, mock_gpu, caplog):
    """keep_alive 0 with unload: sleep puts the engine to sleep; `engine stop` lands while
    /sleep is in flight, and /sleep answers 200 afterwards. It stays stopped."""

    async def main():
        with SleepyEngine() as fake:
            fake.hold.add("/sleep")
            with stand_in(home, fake, Status.READY, keep_alive=0, unload="sleep") as eid:
                _record_us_as_the_gateway(home)
                async with inprocess_gateway(home / "state.json", **GATEWAY) as (gw, client):
                    await _until(lambda: "/sleep" in fake.calls, "the supervisor's /sleep")
                    await asyncio.to_thread(
                        EngineManager(StateStore(home / "state.json")).stop, eid
                    )
                    _assert_stopped_and_released(home, eid)
                    fake.release("/sleep")  # the late 200
                    await _until(lambda: eid not in gw.supervisor.status()["actions"], "unload end")
                    await gw.supervisor.round()
                    _assert_stopped_and_released(home, eid)
                    response = await client.post("/v1/chat/completions", json=CHAT)
                    assert response.status_code == 404  # not live: nothing to wake
                    assert "/wake_up" not in fake.calls
                    _assert_stopped_and_released(home, eid)

    asyncio.run(main())
    assert "refused stopped -> sleeping" in caplog.text


def test_stop_during_wake(home, mock_gpu):
    """A request wakes a sleeping engine; `engine stop` lands while /wake_up is in flight.
    The request gets 503 model_loading, and the engine stays stopped and released."""

    async def main():
        with SleepyEngine() as fake:
            fake.hold.add("/wake_up")
            with stand_in(home, fake, Status.SLEEPING, keep_alive=3600, unload="sleep") as eid:
                async with inprocess_gateway(home / "state.json", **GATEWAY) as (_, client):
                    request = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
                    await _until(lambda: "/wake_up" in fake.calls, "the wake")
                    state = _state(home)
                    assert state.engines[eid].status == Status.WAKING
                    assert state.reservations[eid].held_gib == GIB  # taken back for the wake
                    await asyncio.to_thread(
                        EngineManager(StateStore(home / "state.json")).stop, eid
                    )
                    fake.release("/wake_up")
                    response = await request
                    assert response.status_code == 503, response.text
                    assert response.json()["error"]["code"] == "model_loading"
                    _assert_stopped_and_released(home, eid)
                    assert not fake.seen  # no generation reached the stopped engine

    asyncio.run(main())


def test_stop_during_restart_back_off(home, mock_gpu):
    """A crashed engine waits out its back-off (reservation kept); `engine stop` then
    releases it, and neither the supervisor nor a late revive starts it again."""

    async def main():
        with (
            SleepyEngine() as fake,
            stand_in(home, fake, Status.RESTARTING, restart="always") as eid,
        ):
            store = StateStore(home / "state.json")
            with store.transaction() as state:
                state.engines[eid].next_restart_at = time.time() + 3600
            _record_us_as_the_gateway(home)
            assert eid in _state(home).reservations  # a restart is due: memory kept
            manager = EngineManager(store)
            async with inprocess_gateway(home / "state.json", **GATEWAY) as (gw, _):
                await asyncio.to_thread(manager.stop, eid)
                _assert_stopped_and_released(home, eid)
                with store.transaction() as state:  # the back-off would be over now
                    state.engines[eid].next_restart_at = time.time() - 1
                await gw.supervisor.round()
                await gw.supervisor.round()
                assert eid not in gw.supervisor.status()["actions"]
                assert await asyncio.to_thread(manager.revive, eid) is None
                # A revive that read `restarting` just before the stop: its spawn is refused.
                spec = _state(home).engines[eid].spec
                only = frozenset({Status.RESTARTING})
                with pytest.raises(OperationFailed, match="stopped meanwhile"):
                    await asyncio.to_thread(manager.spawn, spec, reuse=Reuse(eid, only_if=only))
                _assert_stopped_and_released(home, eid)

    asyncio.run(main())


def test_crash_during_wake(home, mock_gpu):
    """The engine's process dies while /wake_up is in flight (restart: no). It ends
    `failed` with its reservation released; the late 200 does not make it ready."""

    async def main():
        with SleepyEngine() as fake:
            fake.hold.add("/wake_up")
            with stand_in(home, fake, Status.SLEEPING, keep_alive=3600, unload="sleep") as eid:
                async with inprocess_gateway(home / "state.json", **GATEWAY) as (_, client):
                    request = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
                    await _until(lambda: "/wake_up" in fake.calls, "the wake")
                    pgid = _state(home).engines[eid].pgid
                    os.killpg(pgid, signal.SIGKILL)  # the crash
                    manager = EngineManager(StateStore(home / "state.json"))
                    await _until(
                        lambda: manager.refresh().engines[eid].status == Status.FAILED, "failed"
                    )
                    fake.release("/wake_up")
                    response = await request
                    assert response.status_code == 503, response.text
                    state = _state(home)
                    assert state.engines[eid].status == Status.FAILED
                    assert eid not in state.reservations

    asyncio.run(main())


def test_wake_timeout_is_503_model_loading_with_retry_after(home, mock_gpu):
    """--wake-timeout runs out while /wake_up hangs: 503 `model_loading` and Retry-After
    (asyncio.TimeoutError, which is not the builtin TimeoutError before Python 3.11)."""

    async def main():
        with SleepyEngine() as fake:
            fake.hold.add("/wake_up")
            with stand_in(home, fake, Status.SLEEPING, keep_alive=3600, unload="sleep"):
                config = {**GATEWAY, "wake_timeout_s": 0.5}
                async with inprocess_gateway(home / "state.json", **config) as (_, client):
                    response = await client.post("/v1/chat/completions", json=CHAT)
                    assert response.status_code == 503, response.text
                    assert response.json()["error"]["code"] == "model_loading"
                    assert "still loading" in response.json()["error"]["message"]
                    assert int(response.headers["retry-after"]) >= 1
                    fake.release("/wake_up")

    asyncio.run(main())


def test_two_gateways_on_one_home_never_resurrect_a_stopped_engine(home, mock_gpu):
    """Two `sage llm serve` on one home (the second runs unrecorded and only routes, but
    wakes on request too). A request to each wakes the sleeping engine at once; `engine
    stop` lands while both wait on /wake_up. Both answer 503; it stays stopped."""
    with SleepyEngine() as fake:
        fake.hold.add("/wake_up")
        with stand_in(home, fake, Status.SLEEPING, keep_alive=3600, unload="sleep") as eid:
            fast = ("--supervise-interval", "0.3", "--health-interval", "0.5")
            with running_gateway(home, *fast) as a, running_gateway(home, *fast) as b:
                assert _state(home).gateway.pid == a.proc.pid  # a supervises, b only routes
                results: dict[str, httpx.Response] = {}

                def ask(name, gateway):
                    results[name] = httpx.post(gateway.v1 + "/chat/completions", json=CHAT,
                                               timeout=60)  # fmt: skip

                threads = [
                    threading.Thread(target=ask, args=(n, g)) for n, g in (("a", a), ("b", b))
                ]
                for thread in threads:
                    thread.start()
                try:
                    # Both gateways wake it: b takes over the `waking` a began.
                    wait_for(lambda: len(fake.calls) >= 2, 30, "a /wake_up from each gateway")
                    stop = sage("llm", "engine", "stop", eid, home=home)
                    assert stop.returncode == 0, stop.stderr
                finally:
                    fake.release("/wake_up")
                    for thread in threads:
                        thread.join(60)
                assert {r.status_code for r in results.values()} == {503}, {
                    k: r.text for k, r in results.items()
                }
                _assert_stopped_and_released(home, eid)
                for gateway in (a, b):  # later requests find nothing live to wake
                    again = httpx.post(gateway.v1 + "/chat/completions", json=CHAT, timeout=30)
                    assert again.status_code == 404, again.text
                _assert_stopped_and_released(home, eid)
                assert not fake.seen
