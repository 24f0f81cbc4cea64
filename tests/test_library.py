"""The whole lifecycle from Python (`sagellm_cli.ControlPlane`), on real engines.

One tiny vLLM engine (`start_engine`) and one MiniLM engine (through a preset, `apply`)
are started once for the module, in parallel; an in-process gateway (`serve(background=
False)`, priority scheduling, one request per engine at a time) sits in front of them.
The tests then drive chat, completions, streams and embeddings through
`UnifiedInferenceClient` (sync and async), `submit_request` with priorities, the
aggregate metrics, the seeds' `ControlPlaneManager`, the background daemon, and finally
stop everything and check that no process is left. The module's finaliser stops whatever
is still running, also after a failure.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import time

import httpx
import psutil
import pytest
from conftest import invoke, needs_st, needs_vllm, stop_all_engines

pytestmark = [pytest.mark.engines, needs_vllm, needs_st]

PRESET = """\
version: 1
name: libtest
description: MiniLM for the library test.
engines:
  - name: embed
    kind: embedding
    model: all-MiniLM-L6-v2
    label: minilm
"""


@pytest.fixture(scope="module")
def lib_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("library") / "sagellm"
    saved = os.environ.get("SAGELLM_HOME")
    yield home
    from sagellm_cli.core.engines.monitor import recorded_gateway
    from sagellm_cli.gateway import daemon

    os.environ["SAGELLM_HOME"] = str(home)
    if recorded_gateway() is not None:
        daemon.stop()
    stop_all_engines(home)
    if saved is None:
        os.environ.pop("SAGELLM_HOME", None)
    else:
        os.environ["SAGELLM_HOME"] = saved


@pytest.fixture(scope="module")
def plane(lib_home):
    from sagellm_cli import ControlPlane

    with ControlPlane(home=lib_home) as cp:
        yield cp


@pytest.fixture(scope="module")
def engines(plane, tiny_model, lib_home):
    """The tiny llm engine and the MiniLM preset, started at the same time."""
    preset = lib_home.parent / "libtest.yaml"
    preset.write_text(PRESET)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        llm = pool.submit(
            plane.start_engine, tiny_model, served_model_name="tiny", label="tiny",
            max_model_len=512, kv_cache_gb=0.0625, timeout=400,
        )  # fmt: skip
        applied = pool.submit(plane.apply, preset, timeout=300)
        record, result = llm.result(), applied.result()
    assert record.status == "ready" and result.ok
    return {"llm": record, "embedding": result.started[0], "preset": preset}


@pytest.fixture(scope="module")
def gateway(plane, engines):
    handle = plane.serve(
        background=False, scheduling="priority", max_inflight_per_engine=1, health_interval_s=1
    )
    try:
        yield handle
    finally:
        handle.stop()


MSG = [{"role": "user", "content": "hello there"}]


def test_engines_presets_gpus_and_errors(plane, engines, lib_home):
    from sagellm_cli import BadInput, NotFound, Plan

    ids = {r.id for r in plane.engines()}
    assert ids == {engines["llm"].id, engines["embedding"].id}
    assert plane.engine("minilm").kind == "embedding"
    assert plane.logs("tiny", lines=5) and len(plane.logs("tiny", lines=5)) <= 5
    plan = plane.apply(engines["preset"], dry_run=True)
    assert isinstance(plan, Plan) and plan.noop  # already up: nothing to do
    assert plane.gpus().inventory.gpus == []  # no GPU here (NVML disabled in the tests)
    with pytest.raises(BadInput, match="unknown field 'max_tokens'"):
        plane.start_engine("x", max_tokens=3)
    with pytest.raises(BadInput, match="timeout"):
        plane.start_engine("x", timeout=float("nan"))
    with pytest.raises(NotFound):
        plane.stop_engine("no-such-engine")
    with pytest.raises(NotFound):
        plane.plan("no-such-preset")
    with pytest.raises(BadInput, match="not an http URL"):
        plane.register_instance("ftp://10.0.0.2:8000", "m")
    with pytest.raises(BadInput, match="an open ControlPlane"):
        type(plane)(home=lib_home.parent / "other")


def test_unified_client_chat_generate_stream_embed(gateway):
    from sagellm_cli import GatewayError, UnifiedInferenceClient

    with UnifiedInferenceClient(gateway.url) as client:
        assert {"tiny", "all-MiniLM-L6-v2"} <= set(client.models())
        assert isinstance(client.chat(MSG, model="tiny", max_tokens=4), str)
        assert client.last_usage["completion_tokens"] > 0
        assert isinstance(client.generate("def main(", model="tiny", max_tokens=4), str)
        with client.chat("hi", model="tiny", stream=True, max_tokens=6, priority="high") as s:
            deltas = list(s)
        assert deltas and all(isinstance(d, str) for d in deltas)
        assert client.last_usage["completion_tokens"] > 0  # the client asks for usage
        pieces = list(client.generate("x", model="tiny", stream=True, max_tokens=6))
        assert len(pieces) >= 2
        vectors = client.embed(["a cat", "a dog", "a car"], model="minilm")
        assert len(vectors) == 3 and len(vectors[0]) == 384
        with pytest.raises(GatewayError) as exc:
            client.chat("hi", model="nope")
        assert exc.value.status == 404


def test_async_client(gateway):
    from sagellm_cli import AsyncUnifiedInferenceClient

    async def main():
        async with AsyncUnifiedInferenceClient(gateway.url) as client:
            text = await client.chat(MSG, model="tiny", max_tokens=4, slo_deadline_ms=60000)
            stream = await client.generate("x", model="tiny", stream=True, max_tokens=5)
            deltas = [d async for d in stream]
            vectors = await client.embed("one text", model="minilm")
        return text, deltas, vectors

    text, deltas, vectors = asyncio.run(main())
    assert isinstance(text, str) and deltas and len(vectors) == 1


def test_submit_request_priorities_reach_the_scheduler(plane, gateway):
    from sagellm_cli import BadInput

    # One request at a time per engine: a long one holds the engine while others queue.
    blocker = plane.submit_request("x", model="tiny", max_tokens=256, ignore_eos=True)
    _until(lambda: plane.metrics().total.inflight == 1)
    lows = [plane.submit_request(MSG, model="tiny", priority="low", max_tokens=4)
            for _ in range(3)]  # fmt: skip
    _until(lambda: plane.metrics().total.queue_depth == 3)
    critical = plane.submit_request(
        MSG, model="tiny", priority="critical", slo_deadline_ms=120_000, max_tokens=4
    )
    _until(lambda: plane.metrics().total.queue_depth == 4)
    assert not blocker.done(), "the blocker finished too soon for the test to mean anything"
    done = critical.result(300)
    results = [h.result(300) for h in lows]
    assert blocker.result(300).usage["completion_tokens"] == 256
    assert done.engine == plane.engine("tiny").id and done.text is not None
    assert all(done.finished_at < r.finished_at for r in results), "critical was not served first"
    assert critical.status.value == "completed" and plane.request(critical.request_id) is critical

    async def awaited():
        return await plane.submit_request("y", model="tiny", max_tokens=2, priority="high")

    assert asyncio.run(awaited()).usage["completion_tokens"] == 2
    with pytest.raises(BadInput, match="priority"):
        plane.submit_request("x", priority="urgent")


def test_metrics_have_percentiles_per_model_and_engine(plane, gateway, engines):
    metrics = plane.metrics(window=600)
    tiny = metrics.models["tiny"]
    assert tiny.completed >= 8 and tiny.requests_per_s > 0 and tiny.output_tokens_per_s > 0
    assert 0 < tiny.latency_ms.p50 <= tiny.latency_ms.p95 <= tiny.latency_ms.p99
    assert tiny.ttft_ms.count >= 2 and tiny.ttft_ms.p50 > 0 and tiny.ttft_ms.p99 > 0
    assert tiny.slo_with_deadline >= 2 and tiny.slo_compliance == 1.0
    assert tiny.admission.get("queued", 0) >= 4  # the priority test's waiters
    engine = metrics.engines[engines["llm"].id]
    assert engine.model == "tiny" and engine.completed == tiny.completed and engine.healthy
    assert metrics.models["all-MiniLM-L6-v2"].completed >= 2
    assert metrics.p95_latency_ms > 0 and metrics.scheduling["policy"] == "priority"
    result = invoke("llm", "top", "--json", "--count", "1", "--window", "600", "--url", gateway.url)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["metrics"]["models"]["tiny"]["completed"] >= tiny.completed
    assert {e["id"] for e in doc["engines"]} == {r.id for r in plane.engines()}


def test_control_plane_manager_with_seed_names(lib_home, engines):
    from sagellm_cli import ControlPlaneManager, RequestMetadata, RequestPriority

    async def main():
        manager = ControlPlaneManager(
            scheduling_policy="cost_optimized", routing_strategy="load_balanced", home=lib_home
        )
        handle = await manager.start()
        try:
            request = RequestMetadata(prompt="x", model_name="tiny", max_tokens=3,
                                      priority=RequestPriority.HIGH)  # fmt: skip
            request_id = await manager.submit_request(request)
            result = await manager.wait_for_result(request_id, timeout=60)
            status = await manager.get_request_status(request_id)
            metrics = manager.get_metrics()
        finally:
            await manager.stop()
        return handle, request_id, result, status, metrics

    handle, request_id, result, status, metrics = asyncio.run(main())
    assert request_id.startswith("req-") and result.request_id == request_id
    assert result.usage["completion_tokens"] == 3 and status.state == "completed"
    assert status.output == result.text and status.error is None
    assert metrics.gateway.scheduling["policy"] == "cost" and metrics.completed_requests == 1
    assert metrics.total_requests == 1 and metrics.active_requests == 0
    assert not handle.running


def test_background_daemon_is_found_by_the_client_and_status(plane, engines, lib_home):
    from sagellm_cli import UnifiedInferenceClient

    with plane.serve() as handle:  # background=True: the daemon `serve --background` runs
        assert handle.mode == "daemon" and handle.running
        with UnifiedInferenceClient.create() as client:
            assert client.base_url == handle.v1
            assert client.embed("x", model="minilm")
        status = invoke("llm", "serve", "--status", "--json")
        doc = json.loads(status.stdout)
        assert doc["running"] and doc["metrics"]["models"]["all-MiniLM-L6-v2"]["completed"] == 1
        pid = handle.pid
    assert not handle.running and not _running(pid)


def test_stop_leaves_no_process(plane, engines, gateway):
    pids = {r.id: (r.pid, r.pgid) for r in plane.engines()}
    gateway.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(gateway.url + "/health", timeout=2)
    assert plane.stop_engine("tiny").status == "stopped"
    assert [r.label for r in plane.down("libtest")] == ["minilm"]
    assert plane.engines() == []
    for pid, pgid in pids.values():
        assert not _running(pid)
        left = [p.pid for p in psutil.process_iter() if _running(p.pid) and _pgid(p.pid) == pgid]
        assert left == [], f"processes left in group {pgid}: {left}"


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie has exited; only its exit status is left)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _until(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)
