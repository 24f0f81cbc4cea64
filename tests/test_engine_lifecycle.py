"""Real engines through `sage` subprocesses: vLLM on the tiny model, MiniLM embeddings.

The llm and embedding engines are started once per module and shared by tests that only
read them; a destructive test (kill -9) starts its own engine, so order never matters.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import sys
import time

import httpx
import psutil
import pytest
from conftest import needs_st, needs_vllm, sage, sage_json
from test_gateway_support import add_engine_record, running_gateway

from sagellm_cli.core.launchers import process
from sagellm_cli.core.paths import scratch_dir
from sagellm_cli.core.state import StateStore

pytestmark = pytest.mark.engines


def _group_alive(record: dict) -> list[psutil.Process]:
    return process.group_members(record["pgid"])


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(scope="module")
def llm_engine(engine_home, tiny_model):
    record = sage_json(
        "llm",
        "engine",
        "start",
        str(tiny_model),
        "--served-model-name",
        "tiny",
        "--label",
        "tiny-chat",
        "--max-model-len",
        "512",
        "--kv-cache-gb",
        "0.0625",
        "--timeout",
        "300",
        home=engine_home,
        timeout=400,
    )
    yield record
    sage("llm", "engine", "stop", record["id"], home=engine_home)


@pytest.fixture(scope="module")
def embedding_engine(engine_home):
    record = sage_json(
        "llm",
        "engine",
        "start",
        "all-MiniLM-L6-v2",
        "--engine-kind",
        "embedding",
        "--label",
        "minilm",
        home=engine_home,
        timeout=300,
    )
    yield record
    sage("llm", "engine", "stop", record["id"], home=engine_home)


@needs_vllm
def test_llm_engine_is_ready_and_serves(llm_engine, engine_home):
    rec = llm_engine
    assert rec["status"] == "ready"
    assert rec["kind"] == "llm" and rec["runtime"] == "vllm"
    assert rec["url"] == f"http://127.0.0.1:{rec['port']}"
    assert "--enforce-eager" in rec["command"] and "--kv-cache-memory-bytes" in rec["command"]
    assert rec["cpu_cores"]  # its own share of the cores (vLLM CPU threads spin otherwise)
    environ = psutil.Process(rec["pid"]).environ()
    assert environ["VLLM_CPU_OMP_THREADS_BIND"] == ",".join(map(str, rec["cpu_cores"]))
    base = rec["url"] + "/v1"
    models = httpx.get(base + "/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    chat = httpx.post(
        base + "/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
        timeout=60,
    ).json()
    assert chat["choices"][0]["finish_reason"] in ("length", "stop")
    assert chat["usage"]["completion_tokens"] >= 1
    comp = httpx.post(
        base + "/completions",
        json={"model": "tiny", "prompt": "def f(", "max_tokens": 5},
        timeout=60,
    ).json()
    assert comp["object"] == "text_completion"


@needs_vllm
def test_llm_engine_streams_sse(llm_engine):
    events = []
    with httpx.stream(
        "POST",
        llm_engine["url"] + "/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 6,
            "stream": True,
        },
        timeout=60,
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len(chunks) >= 2


@needs_st
def test_embedding_engine_serves(embedding_engine):
    rec = embedding_engine
    assert rec["status"] == "ready" and rec["runtime"] == "sentence-transformers"
    assert rec["gpus"] == []
    resp = httpx.post(
        rec["url"] + "/v1/embeddings",
        json={"model": "all-MiniLM-L6-v2", "input": ["a cat sits", "a dog runs"]},
        timeout=60,
    )
    assert resp.status_code == 200
    data = resp.json()["data"]
    assert len(data) == 2 and len(data[0]["embedding"]) == 384


@needs_vllm
def test_list_show_and_logs(llm_engine, engine_home):
    listed = sage_json("llm", "engine", "list", home=engine_home)
    assert llm_engine["id"] in {r["id"] for r in listed}
    shown = sage_json("llm", "engine", "show", "tiny-chat", home=engine_home)
    assert shown["id"] == llm_engine["id"] and shown["status"] == "ready"
    tail = sage("llm", "engine", "logs", llm_engine["id"], "-n", "5", home=engine_home, check=True)
    assert len(tail.stdout.splitlines()) == 5
    full = sage_json("llm", "engine", "logs", llm_engine["id"], "-n", "100000", home=engine_home)
    assert f"starting engine {llm_engine['id']}" in full["lines"][1]
    assert any("GET /v1/models" in line for line in full["lines"])
    table = sage("llm", "engine", "list", home=engine_home, check=True, env={"COLUMNS": "160"})
    assert "tiny-chat" in table.stdout and "ready" in table.stdout


@needs_st
def test_restart_keeps_id_and_port_and_appends_log(embedding_engine, engine_home):
    rec = embedding_engine
    log_size = os.path.getsize(rec["log_path"])
    again = sage_json("llm", "engine", "restart", rec["id"], home=engine_home, timeout=300)
    assert again["id"] == rec["id"] and again["port"] == rec["port"]
    assert again["status"] == "ready" and again["pid"] != rec["pid"]
    assert not _group_alive(rec)
    assert os.path.getsize(rec["log_path"]) > log_size
    assert httpx.get(again["url"] + "/health").status_code == 200


def test_concurrent_starts_get_distinct_ports(engine_home, tmp_path):
    not_a_model = tmp_path / "not-a-model"  # exists, so the start is not refused up front
    not_a_model.mkdir()

    def start(i: int):
        return sage_json(
            "llm",
            "engine",
            "start",
            str(not_a_model),
            "--no-wait",
            "--label",
            f"race-{i}",
            home=engine_home,
            timeout=120,
        )

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        records = list(pool.map(start, range(4)))
    try:
        ports = {r["port"] for r in records}
        assert len(ports) == 4
        listed = {r["id"]: r for r in sage_json("llm", "engine", "list", "--all", home=engine_home)}
        assert all(r["id"] in listed for r in records)
    finally:
        for r in records:
            sage("llm", "engine", "stop", r["id"], home=engine_home)
    for r in records:
        assert not _group_alive(r)


def test_a_missing_model_path_is_refused_before_anything_starts(home):
    proc = sage("llm", "engine", "start", "/nonexistent/tiny-model", "--json", home=home)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: model '/nonexistent/tiny-model' is a path that does not exist (give an existing"
        " model directory, a cached name or a hub id such as Qwen/Qwen2.5-0.5B-Instruct)"
    ]
    assert sage_json("llm", "engine", "list", "--all", home=home) == []


@needs_vllm
def test_a_model_that_fails_to_load_says_why_in_one_line(home, tmp_path):
    """An engine that dies loading: the error names vLLM's own exception, with no
    traceback (that stays in `sage llm engine logs`), and nothing is left running."""
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    proc = sage("llm", "engine", "start", str(not_a_model), "--timeout", "240", home=home)
    assert proc.returncode == 1, proc.stderr
    [error] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "exited during load" in error and "Invalid repository ID or local directory" in error
    assert "Traceback" not in proc.stderr and 'File "' not in proc.stderr
    records = sage_json("llm", "engine", "list", "--all", home=home)
    assert len(records) == 1 and records[0]["status"] == "failed"
    assert records[0]["exit_code"] not in (None, 0)
    assert not _group_alive(records[0])


def test_stop_is_idempotent_and_unknown_is_3(home):
    """A second stop is a no-op that succeeds (the record keeps its first stop time), and
    `--json` is a list either way. A sleeping process group stands in for an engine."""
    home.mkdir(parents=True, exist_ok=True)
    record = _stand_in_engine(home, "idem0001", "import time; time.sleep(600)")
    first = sage("llm", "engine", "stop", "idem0001", "--json", home=home)
    assert first.returncode == 0, first.stderr
    [stopped] = json.loads(first.stdout)
    assert stopped["status"] == "stopped" and not _group_alive(record.to_dict())
    again = sage("llm", "engine", "stop", "idem0001", "--json", home=home)
    assert again.returncode == 0
    [still] = json.loads(again.stdout)
    assert still["status"] == "stopped" and still["stopped_at"] == stopped["stopped_at"]
    plain = sage("llm", "engine", "stop", "idem0001", home=home)
    assert plain.returncode == 0 and "already stopped" in plain.stderr
    assert sage("llm", "engine", "stop", "does-not-exist", home=home).returncode == 3


def _stand_in_engine(home, engine_id: str, code: str, **fields):
    """A real process group recorded as a ready engine, for lifecycle paths that need no
    model: `code` runs under the local launcher exactly as an engine would."""
    from sagellm_cli.core.launchers.base import launcher_for

    handle = launcher_for("local").spawn(engine_id, [sys.executable, "-c", code],
                                         dict(os.environ), home / f"{engine_id}.log")  # fmt: skip
    began = time.time() - 5
    return add_engine_record(home, engine_id, 1, handle.pid, pgid=handle.pgid,
                             started_at=began, created_at=began, **fields)  # fmt: skip


def test_corrupted_state_file_is_a_clear_error(home):
    home.mkdir(parents=True)
    (home / "state.json").write_text('{"engines": {oops')
    proc = sage("llm", "engine", "list", home=home)
    assert proc.returncode == 1
    assert str(home / "state.json") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (home / "state.json").read_text() == '{"engines": {oops'


@needs_vllm
def test_kill_9_of_the_api_server_reaps_its_engine_core_without_any_command(home, tiny_model):
    """vLLM with its engine core in a separate process (as on a GPU): kill -9 of the API
    server must not orphan the core. A running gateway reaps it within 10 s, unasked."""
    with running_gateway(home, "--health-interval", "1"):
        rec = sage_json(
            "llm", "engine", "start", str(tiny_model), "--max-model-len", "256",
            "--kv-cache-gb", "0.0625", "--env", "VLLM_ENABLE_V1_MULTIPROCESSING=1",
            "--timeout", "300", home=home, timeout=400,
        )  # fmt: skip
        helpers = [p for p in _group_alive(rec) if p.pid != rec["pid"]]
        assert any("EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name()
                   for p in helpers), [p.name() for p in helpers]  # fmt: skip
        store = StateStore(home / "state.json")

        def reaped() -> bool:  # the file read directly: no command reconciles, the gateway does
            record = store.read().engines[rec["id"]]
            return not _group_alive(rec) and record.status == "failed" and not record.orphans

        os.kill(rec["pid"], signal.SIGKILL)
        killed = time.monotonic()
        while not reaped() and time.monotonic() - killed < 15:
            time.sleep(0.2)
        took = time.monotonic() - killed
        assert not _group_alive(rec), "the engine core outlived its API server"
        assert reaped() and took < 10, f"reaped after {took:.1f}s"
        assert store.read().engines[rec["id"]].exit_code == 137
    assert not scratch_dir(rec["id"]).exists()  # vLLM's TMPDIR leftovers are cleaned up
    stopped = sage("llm", "engine", "stop", rec["id"], home=home)
    assert stopped.returncode == 0 and _port_free(rec["port"])
    pruned = sage_json("llm", "engine", "prune", home=home)
    assert rec["id"] in pruned and not os.path.exists(rec["log_path"])
    assert sage("llm", "engine", "stop", rec["id"], home=home).returncode == 3


def test_reconcile_stops_a_dead_engines_helpers_before_releasing_its_gpus(home, monkeypatch):
    """The same promise on the CLI's path, with a stand-in process tree (a parent and a
    helper child in one group) so that it runs without vLLM: the next reconcile reaps."""
    from sagellm_cli.core.launchers.base import launcher_for
    from sagellm_cli.core.records import GpuReservation

    monkeypatch.setenv("SAGELLM_MOCK_GPUS", "1x80")
    home.mkdir(parents=True, exist_ok=True)
    # A parent and a helper child in one group, both sleeping.
    _stand_in_engine(home, "deadbeef", "import os, time\nos.fork()\ntime.sleep(600)", gpus=[0])
    store = StateStore(home / "state.json")
    with store.transaction() as state:
        state.reservations["deadbeef"] = GpuReservation("deadbeef", [0], 20.0, mock=True)
    record = store.read().engines["deadbeef"]
    try:
        deadline = time.monotonic() + 5
        while len(_group_alive(record.to_dict())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        helper = [p for p in _group_alive(record.to_dict()) if p.pid != record.pid]
        assert helper, "the stand-in helper did not start"
        os.kill(record.pid, signal.SIGKILL)
        listed = sage_json("llm", "engine", "list", "--all", home=home)
        assert [(r["status"], r["orphans"]) for r in listed] == [("failed", False)]
        assert not _group_alive(record.to_dict())
        assert store.read().reservations == {}
    finally:
        launcher_for("local").terminate(record, timeout=1)


@needs_st
def test_readiness_timeout_stops_the_engine(home):
    proc = sage(
        "llm",
        "engine",
        "start",
        "all-MiniLM-L6-v2",
        "--engine-kind",
        "embedding",
        "--timeout",
        "1",
        home=home,
    )
    assert proc.returncode == 1
    assert "not ready after 1s" in proc.stderr
    [record] = sage_json("llm", "engine", "list", "--all", home=home)
    assert record["status"] == "failed"
    assert not _group_alive(record)
    assert _port_free(record["port"])


@needs_st
def test_ctrl_c_while_waiting_stops_the_engine(home):
    import subprocess
    import sys

    env = {**os.environ, "SAGELLM_HOME": str(home)}
    starter = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sagellm_cli",
            "llm",
            "engine",
            "start",
            "all-MiniLM-L6-v2",
            "--engine-kind",
            "embedding",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        records = []
        while time.monotonic() < deadline and not any(r.get("pid") for r in records):
            time.sleep(0.3)
            records = sage_json("llm", "engine", "list", "--all", home=home)
        starter.send_signal(signal.SIGINT)
        _, err = starter.communicate(timeout=60)
    finally:
        starter.kill()
    assert starter.returncode == 130, err
    [record] = sage_json("llm", "engine", "list", "--all", home=home)
    assert record["status"] == "stopped"
    assert not _group_alive(record)


@needs_vllm
def test_engines_use_vllms_own_compile_cache_unless_private(home, tiny_model):
    """Defaults leave VLLM_CACHE_ROOT alone (vLLM's cache is reused across engines and
    runs); `--cache private` gives the engine its own under the state dir."""
    try:
        shared = sage_json("llm", "engine", "start", str(tiny_model), "--no-wait", home=home)
        private = sage_json("llm", "engine", "start", str(tiny_model), "--no-wait",
                            "--cache", "private", home=home)  # fmt: skip
        assert "VLLM_CACHE_ROOT" not in psutil.Process(shared["pid"]).environ()
        root = psutil.Process(private["pid"]).environ()["VLLM_CACHE_ROOT"]
        assert root == str(home / "cache" / "vllm" / private["id"])
        assert os.path.isdir(root)
        assert private["spec"]["cache"] == "private" and shared["spec"]["cache"] == "shared"
    finally:
        sage("llm", "engine", "stop", "--all", home=home)
