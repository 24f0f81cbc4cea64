"""The supervisor inside `sage llm serve`: restart policies, hung engines, idle unload, wake.

Every engine here is a real process (MiniLM on our sentence-transformers server, or the
tiny Qwen2 on vLLM's CPU build) under a real foreground `sage llm serve`; the assertions
are on processes, the state file (through `engine list --json`), HTTP answers and the
gateway's /metrics. The policy arithmetic is unit-tested at the top.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import time

import httpx
import psutil
import pytest
from conftest import invoke, needs_st, needs_vllm, sage, sage_json, wait_for
from test_gateway_support import running_gateway

from sagellm_cli.core.engines.supervision import backoff_s, schedule_restart
from sagellm_cli.core.inputs.durations import format_duration, parse_duration
from sagellm_cli.core.records import EngineRecord, EngineSpec

MINILM = "all-MiniLM-L6-v2"
# Fast rounds so that each test waits seconds, not minutes; a /health slower than the
# default 1 s on a loaded box must not turn an engine unhealthy (no test here is about it).
FAST = ("--supervise-interval", "0.3", "--health-interval", "0.5", "--health-timeout", "5")


# --------------------------------------------------------------------------- policies


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("300", 300.0), ("5m", 300.0), ("1h30m", 5400.0), ("250ms", 0.25), ("0", 0.0),
     ("-1", -1.0), ("-5m", -1.0), (42, 42.0)],
)  # fmt: skip
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_bad_durations_name_the_format():
    for bad in ("5x", "m5", "1h-3m", ""):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)
    assert [format_duration(s) for s in (-1, 300, 90, 0.5, 7200)] == [
        "never", "5m", "1m30s", "0.5s", "2h",
    ]  # fmt: skip


def _crashed(tmp_path, policy: str, exit_code: int | None, restart_times=(), max_restarts=5):
    spec = EngineSpec(model="m", restart=policy, max_restarts=max_restarts)
    log = tmp_path / "e.log"
    log.write_text("loading\nTraceback (most recent call last)\nRuntimeError: boom\n")
    return EngineRecord(
        id="e1", kind="llm", runtime="vllm", model="m", served_model_name="m", host="127.0.0.1",
        port=1, status="ready", exit_code=exit_code, restart_times=list(restart_times),
        log_path=str(log), spec=spec,
    )  # fmt: skip


def test_policy_decides_like_docker(tmp_path):
    now = 1000.0
    assert not schedule_restart(_crashed(tmp_path, "no", 1), now, "x")
    assert not schedule_restart(_crashed(tmp_path, "on-failure", 0), now, "x")
    for policy, code in (("on-failure", 137), ("on-failure", None), ("always", 0)):
        record = _crashed(tmp_path, policy, code)
        assert schedule_restart(record, now, "crashed")
        assert record.status == "restarting" and record.next_restart_at == now + 1
        assert record.last_exit == code


def test_back_off_doubles_to_a_minute_and_old_restarts_expire(tmp_path):
    assert [backoff_s(n) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    record = _crashed(tmp_path, "always", 1, restart_times=[0.0, 500.0, 990.0])
    assert schedule_restart(record, 1000.0, "x")
    # The restart at t=0 is outside the 10-minute window: two count, so 4 s.
    assert record.restart_times == [500.0, 990.0] and record.next_restart_at == 1004.0


def test_crash_loop_fails_with_the_reason_and_the_log_tail(tmp_path):
    record = _crashed(tmp_path, "on-failure", 1, restart_times=[990.0, 995.0], max_restarts=2)
    assert schedule_restart(record, 1000.0, "engine process exited with code 1")
    assert record.status == "failed"
    assert record.error.startswith("crash loop: 2 restarts within 10 min")
    assert "RuntimeError: boom" in record.error


def test_bad_supervision_options_exit_2(home):
    for args, word in (
        (["--keep-alive", "soon"], "--keep-alive"),
        (["--restart", "sometimes"], "restart"),
        (["--unload", "hibernate"], "unload"),
    ):
        result = invoke("llm", "engine", "start", "some/model", *args)
        assert result.exit_code == 2, result.output
        assert word in result.stderr and "Traceback" not in result.stderr
    # vLLM's sleep mode is CUDA-only: refused before anything is recorded.
    result = invoke("llm", "engine", "start", "some/model", "--unload", "sleep")
    assert result.exit_code == 2 and "sleep" in result.stderr
    assert (
        not (home / "state.json").exists() or "some/model" not in (home / "state.json").read_text()
    )


def test_preset_engines_restart_on_failure_by_default_and_yaml_no_means_no(tmp_path):
    from sagellm_cli.core.presets.loader import load_file

    path = tmp_path / "p.yaml"
    path.write_text(
        "version: 1\nname: p\nengines:\n"
        "  - {name: a, model: m}\n"
        "  - {name: b, model: m, restart: no, keep_alive: 10m}\n"
    )
    a, b = load_file(path).config.engines
    assert a.restart == "on-failure" and a.keep_alive == -1
    assert b.restart == "no" and b.keep_alive == 600


# --------------------------------------------------------------------------- helpers


def _engine(home, ref: str) -> dict:
    records = sage_json("llm", "engine", "list", "--all", home=home)
    matches = [r for r in records if r["id"] == ref or r["label"] == ref]
    assert len(matches) == 1, records
    return matches[0]


def _wait_for(home, ref: str, predicate, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while True:
        record = _engine(home, ref)
        if not seen or seen[-1] != record["status"]:
            seen.append(record["status"])
        if predicate(record):
            return record
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout}s; statuses {seen}; {record}")
        time.sleep(0.3)


def _metric(gateway, name: str, engine_id: str) -> float:
    text = httpx.get(gateway.url + "/metrics", timeout=10).text
    match = re.search(rf'^{name}{{engine="{engine_id}"[^}}]*}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def _wait_metric(gateway, name: str, engine_id: str, value: float, timeout: float = 15) -> None:
    wait_for(lambda: _metric(gateway, name, engine_id) == value, timeout, f"{name} = {value}")


def _engine_processes(engine_id: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("SAGELLM_ENGINE_ID") == engine_id:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _embed(gateway, model: str) -> httpx.Response:
    return httpx.post(gateway.v1 + "/embeddings", json={"model": model, "input": ["hi"]},
                      timeout=120)  # fmt: skip


# --------------------------------------------------------------------------- restarts


@needs_st
def test_kill_9_restarts_and_an_explicit_stop_is_never_undone(home):
    with running_gateway(home, *FAST) as gateway:
        record = sage_json(
            "llm", "engine", "start", MINILM, "-k", "embedding", "--label", "emb",
            "--restart", "always", home=home,
        )  # fmt: skip
        first_pid, port = record["pid"], record["port"]
        os.kill(first_pid, signal.SIGKILL)
        again = _wait_for(
            home, "emb", lambda r: r["status"] == "ready" and r["pid"] not in (None, first_pid),
            120, "restart after kill -9",
        )  # fmt: skip
        assert again["id"] == record["id"] and again["restarts"] == 1
        assert again["last_exit"] == 128 + signal.SIGKILL
        assert again["port"] == port  # the same port, as it was free
        assert _embed(gateway, "emb").status_code == 200
        _wait_metric(gateway, "sagellm_engine_restarts_total", record["id"], 1)
        assert "restarting engine" in gateway.log_text()

        sage("llm", "engine", "stop", "emb", home=home, check=True)
        time.sleep(2.0)  # several supervisor rounds
        stopped = _engine(home, "emb")
        assert stopped["status"] == "stopped" and stopped["restarts"] == 1
        assert not _engine_processes(record["id"])


@needs_st
def test_a_crash_loop_ends_failed_with_the_reason(home):
    with running_gateway(home, *FAST):
        sage(
            "llm", "engine", "start", MINILM, "-k", "embedding", "--label", "loop",
            "--restart", "on-failure", "--max-restarts", "2", "--extra-arg", "--no-such-flag",
            home=home,
        )  # fmt: skip
        failed = _wait_for(
            home, "loop", lambda r: r["status"] == "failed", 120, "crash loop detection"
        )
        assert failed["restarts"] == 2 and failed["last_exit"] == 2
        assert failed["error"].startswith("crash loop: 2 restarts")
        assert "no-such-flag" in failed["error"]  # the log tail names the cause
        assert not _engine_processes(failed["id"])
        time.sleep(1.5)
        assert _engine(home, "loop")["restarts"] == 2  # no more attempts


@needs_st
def test_without_a_gateway_a_crash_is_just_failed(home):
    record = sage_json(
        "llm", "engine", "start", MINILM, "-k", "embedding", "--restart", "always", home=home
    )
    listed = sage("llm", "engine", "list", home=home, check=True)
    assert "no `sage llm serve` runs" in listed.stderr
    os.kill(record["pid"], signal.SIGKILL)
    failed = _wait_for(home, record["id"], lambda r: r["status"] == "failed", 30, "failed")
    assert failed["restarts"] == 0


# --------------------------------------------------------------------------- hung engines


def _engine_core(pid: int) -> psutil.Process:
    children = psutil.Process(pid).children(recursive=True)
    cores = [c for c in children if "EngineCore" in " ".join([c.name(), *c.cmdline()])]
    assert cores, [c.cmdline() for c in children]
    return cores[0]


@needs_vllm
def test_an_engine_that_answers_health_but_not_generation_is_restarted(home, tiny_model):
    args = ("--probe-interval", "1", "--probe-timeout", "3", "--failure-threshold", "2")
    with running_gateway(home, *FAST, *args) as gateway:
        record = sage_json(
            "llm", "engine", "start", str(tiny_model), "--label", "hang",
            "--restart", "on-failure", home=home,
        )  # fmt: skip
        core = _engine_core(record["pid"])
        core.send_signal(signal.SIGSTOP)
        try:
            # /health still answers: only a generation shows the engine is stuck.
            health = httpx.get(record["url"] + "/health", timeout=5)
            assert health.status_code == 200
            again = _wait_for(
                home, "hang",
                lambda r: r["status"] == "ready" and r["pid"] != record["pid"], 240,
                "restart of a hung engine",
            )  # fmt: skip
        finally:
            if core.is_running():
                core.send_signal(signal.SIGCONT)
        assert again["restarts"] == 1 and again["unresponsive_since"] is None
        assert "alive but not answering" in gateway.log_text()
        assert not core.is_running() or core.status() == psutil.STATUS_ZOMBIE
        chat = httpx.post(
            gateway.v1 + "/chat/completions",
            json={"model": "hang", "messages": [{"role": "user", "content": "hi"}],
                  "max_tokens": 2},
            timeout=120,
        )  # fmt: skip
        assert chat.status_code == 200, chat.text


# --------------------------------------------------------------------------- idle unload


def _chat(gateway, model: str, *, stream: bool = False) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return httpx.post(gateway.v1 + "/chat/completions", json={**body, "stream": stream},
                      timeout=300)  # fmt: skip


@needs_vllm
def test_lazy_engine_loads_once_for_concurrent_requests_and_unloads_again(home, tiny_model):
    with running_gateway(home, *FAST) as gateway:
        lazy = sage_json(
            "llm", "engine", "start", str(tiny_model), "--label", "lazy", "--no-wait",
            "--keep-alive", "0", home=home,
        )  # fmt: skip
        assert lazy["status"] == "idle" and lazy["pid"] is None
        assert not _engine_processes(lazy["id"])
        models = wait_for(  # the gateway re-reads the state file twice a second
            lambda: httpx.get(gateway.v1 + "/models", timeout=10).json()["data"],
            10, "the lazy engine reaches /v1/models",
        )  # fmt: skip
        assert [(m["id"], m["ready"]) for m in models] == [
            (str(tiny_model), False),
            ("lazy", False),
        ]

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda _: _chat(gateway, "lazy"), range(3)))
        assert [a.status_code for a in answers] == [200, 200, 200], answers[0].text
        assert {a.headers["x-sagellm-engine"] for a in answers} == {lazy["id"]}
        assert _metric(gateway, "sagellm_engine_wakes_total", lazy["id"]) == 1

        # keep_alive 0: unloaded as soon as it is idle; nothing left behind.
        idle = _wait_for(home, "lazy", lambda r: r["status"] == "idle", 30, "unload")
        assert not _engine_processes(lazy["id"])
        assert idle["cpu_cores"] == [] and idle["gpus"] == []
        state = (home / "state.json").read_text()
        assert lazy["id"] not in state.split('"reservations"')[1]
        _wait_metric(gateway, "sagellm_engine_unloads_total", lazy["id"], 1)

        # A streaming request wakes it again; its first bytes are the engine's own.
        with httpx.stream(
            "POST", gateway.v1 + "/chat/completions", timeout=300,
            json={"model": "lazy", "stream": True, "max_tokens": 2,
                  "messages": [{"role": "user", "content": "hi"}]},
        ) as response:  # fmt: skip
            assert response.status_code == 200
            lines = [line for line in response.iter_lines() if line]
        assert lines[0].startswith("data: {") and '"choices"' in lines[0]
        assert lines[-1] == "data: [DONE]"
        assert _metric(gateway, "sagellm_engine_wakes_total", lazy["id"]) == 2
        _wait_for(home, "lazy", lambda r: r["status"] == "idle", 30, "second unload")


@needs_st
def test_models_that_do_not_fit_together_swap_least_recently_used_first(home, monkeypatch):
    # One mock 16 GiB GPU; each engine reserves 10 GiB (the processes run on the CPU).
    monkeypatch.setenv("SAGELLM_MOCK_GPUS", "1x16")
    with running_gateway(home, *FAST) as gateway:
        common = ("-k", "embedding", "--use-gpu", "--gpu-memory-gb", "10", "--keep-alive", "1h")
        a = sage_json("llm", "engine", "start", MINILM, "--label", "a",
                      "--served-model-name", "model-a", *common, home=home)  # fmt: skip
        b = sage_json("llm", "engine", "start", MINILM, "--label", "b", "--no-wait",
                      "--served-model-name", "model-b", *common[:-1], "0", home=home)  # fmt: skip
        assert a["status"] == "ready" and b["status"] == "idle"

        assert _embed(gateway, "model-b").status_code == 200  # a is unloaded for it
        assert _engine(home, "a")["status"] == "idle" and not _engine_processes(a["id"])
        assert _engine(home, "b")["status"] in ("ready", "unloading", "idle")  # keep_alive 0
        assert "to make room for" in gateway.log_text()

        back = _embed(gateway, "model-a")  # and back
        assert back.status_code == 200, back.text
        assert _engine(home, "a")["status"] == "ready"
        _wait_for(home, "b", lambda r: r["status"] == "idle", 30, "b unloaded")
        gpu = sage_json("llm", "gpu", home=home)
        reserved = {r["engine_id"] for r in gpu["reservations"]}
        assert reserved == {a["id"]}
