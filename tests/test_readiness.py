"""Ready means it answers: an engine is `ready` only after one real request succeeded, and
one that dies after that is `failed` with its last log lines.

The engine here is the fake OpenAI server of tests/fakes.py started *through* `sage llm
engine start` (SAGELLM_ENGINE_PYTHON points at a wrapper that turns vLLM's argv into the
fake's): the point is our readiness logic, and a real vLLM cannot be told to answer
/health and then fail every generation on demand. Real engines pass through the same
check in every other engine test.
"""

from __future__ import annotations

import os
import signal
import stat
import sys
from pathlib import Path

import psutil
from conftest import ROOT, sage, sage_json, wait_for

WRAPPER = """#!{python}
import os, sys
argv = sys.argv[1:]
def value(flag):
    return argv[argv.index(flag) + 1]
print("fake engine: hello from the log", flush=True)
os.execv({python!r}, [{python!r}, {fakes!r}, "--port", value("--port"),
         "--model", value("--served-model-name"), *{extra!r}])
"""


def _fake_engine_python(tmp_path: Path, *extra: str) -> dict[str, str]:
    path = tmp_path / "engine-python"
    path.write_text(
        WRAPPER.format(python=sys.executable, fakes=str(ROOT / "tests" / "fakes.py"), extra=extra)
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return {"SAGELLM_ENGINE_PYTHON": str(path)}


def _model_dir(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"torch_dtype": "float32"}')
    return model


def _records(home: Path) -> dict[str, dict]:
    return {r["id"]: r for r in sage_json("llm", "engine", "list", "--all", home=home)}


def test_an_engine_whose_first_generation_fails_is_never_ready(home, tmp_path):
    env = _fake_engine_python(tmp_path, "--status", "500")
    proc = sage(
        "llm", "engine", "start", str(_model_dir(tmp_path)), "--served-model-name", "m",
        "--timeout", "60", home=home, env=env,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "is up but its first /v1/completions request answered 500" in proc.stderr
    assert "Traceback" not in proc.stderr
    (record,) = _records(home).values()
    assert record["status"] == "failed" and record["ready_at"] is None
    assert "answered 500" in record["error"]
    assert not psutil.pid_exists(record["pid"]) or psutil.Process(record["pid"]).status() == (
        psutil.STATUS_ZOMBIE
    )


def test_a_ready_engine_that_dies_is_failed_with_its_last_log_lines(home, tmp_path):
    env = _fake_engine_python(tmp_path)
    record = sage_json(
        "llm", "engine", "start", str(_model_dir(tmp_path)), "--served-model-name", "m",
        "--timeout", "60", home=home, env=env,
    )  # fmt: skip
    assert record["status"] == "ready"
    os.kill(record["pid"], signal.SIGKILL)
    dead = wait_for(
        lambda: (r := _records(home)[record["id"]])["status"] == "failed" and r, 15, "failed"
    )
    assert "last log lines:" in dead["error"]
    assert "fake engine: hello from the log" in dead["error"]
