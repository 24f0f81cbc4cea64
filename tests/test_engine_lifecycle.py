"""Real engines through `sage` subprocesses: vLLM on the tiny model, MiniLM embeddings.

The llm and embedding engines are started once per module and shared; the
destructive tests (kill -9) run last on them.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import time

import httpx
import psutil
import pytest
from conftest import needs_st, needs_vllm, sage, sage_json

from sagellm_cli.core import process
from sagellm_cli.core.paths import scratch_dir

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


def test_concurrent_starts_get_distinct_ports(engine_home):
    def start(i: int):
        return sage_json(
            "llm",
            "engine",
            "start",
            f"/nonexistent/model-{i}",
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


@needs_vllm
def test_missing_model_fails_with_log_tail(home):
    proc = sage("llm", "engine", "start", "/nonexistent/tiny-model", "--timeout", "240", home=home)
    assert proc.returncode == 1, proc.stderr
    assert "exited during load" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) > 3  # the log tail precedes the error line
    records = sage_json("llm", "engine", "list", "--all", home=home)
    assert len(records) == 1 and records[0]["status"] == "failed"
    assert records[0]["exit_code"] not in (None, 0)
    assert not _group_alive(records[0])


def test_stop_is_idempotent_and_unknown_is_3(engine_home):
    assert sage("llm", "engine", "stop", "does-not-exist", home=engine_home).returncode == 3


def test_corrupted_state_file_is_a_clear_error(home):
    home.mkdir(parents=True)
    (home / "state.json").write_text('{"engines": {oops')
    proc = sage("llm", "engine", "list", home=home)
    assert proc.returncode == 1
    assert str(home / "state.json") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (home / "state.json").read_text() == '{"engines": {oops'


@needs_vllm
def test_kill_9_marks_failed_and_stop_leaves_no_orphans(llm_engine, engine_home):
    rec = llm_engine
    os.kill(rec["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 20
    status = None
    while time.monotonic() < deadline:
        status = sage_json("llm", "engine", "show", rec["id"], home=engine_home)
        if status["status"] == "failed":
            break
        time.sleep(0.5)
    assert status["status"] == "failed"
    assert status["exit_code"] == 137
    assert not scratch_dir(rec["id"]).exists()  # vLLM's TMPDIR leftovers are cleaned up
    assert rec["id"] not in {r["id"] for r in sage_json("llm", "engine", "list", home=engine_home)}
    stopped = sage("llm", "engine", "stop", rec["id"], home=engine_home)
    assert stopped.returncode == 0
    assert not _group_alive(rec)
    assert _port_free(rec["port"])
    pruned = sage_json("llm", "engine", "prune", home=engine_home)
    assert rec["id"] in pruned
    assert not os.path.exists(rec["log_path"])
    again = sage("llm", "engine", "stop", rec["id"], home=engine_home)
    assert again.returncode == 3


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
