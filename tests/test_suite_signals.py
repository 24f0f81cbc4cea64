"""The suite itself stops cleanly on SIGTERM (CI's time limit, `kill`).

An inner pytest runs with this suite's conftest (`-p conftest`) on two throw-away test
files; each holds a fixture that owns a process in its own session, as an engine is, and
sleeps. SIGTERM to the inner pytest (its main pid, or its whole process group) must end
the run as interrupted (exit 2) within seconds, after every fixture's teardown has run
to its end: the processes are gone and no SystemExit or internal error shows. With
pytest-xdist the controller passes the signal on to its workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import wait_for

TESTS = Path(__file__).resolve().parent

INNER = """
import os, subprocess, sys, time
from pathlib import Path

import pytest

MARKS = Path(os.environ["SIGTEST_MARKS"])


@pytest.fixture
def engine():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                            start_new_session=True)
    yield proc
    time.sleep(1)  # a teardown that takes a while, like stopping an engine
    proc.kill()
    proc.wait()
    (MARKS / "torn-{name}").write_text(str(proc.pid))


def test_waits(engine):
    (MARKS / "started-{name}").write_text(str(engine.pid))
    time.sleep(600)
"""


def _variants():
    yield pytest.param(["-p", "no:xdist"], "pid", id="plain")  # one test at a time
    try:
        import xdist  # noqa: F401
    except ImportError:
        return
    yield pytest.param(["-n", "2", "--dist", "loadfile"], "pid", id="xdist")
    yield pytest.param(["-n", "2", "--dist", "loadfile"], "group", id="xdist-group-kill")


@pytest.mark.parametrize(("options", "target"), list(_variants()))
def test_sigterm_ends_the_run_after_every_teardown(tmp_path, options, target):
    marks = tmp_path / "marks"
    marks.mkdir()
    names = ("a", "b")
    for name in names:
        (tmp_path / f"test_{name}.py").write_text(INNER.replace("{name}", name))
    env = {**os.environ, "SIGTEST_MARKS": str(marks)}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_XDIST_WORKER", None)
    cmd = [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q",
           "--rootdir", str(tmp_path), *options, str(tmp_path)]  # fmt: skip
    inner = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    owned: list[int] = []
    try:
        running = 1 if "no:xdist" in options else len(names)

        def started():
            found = [p for p in marks.glob("started-*") if p.read_text()]
            return len(found) == running and found

        for path in wait_for(started, 120, "the inner tests running"):
            owned.append(int(path.read_text()))
        names = [p.name.removeprefix("started-") for p in marks.glob("started-*")]
        if target == "group":
            os.killpg(inner.pid, signal.SIGTERM)
        else:
            inner.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        out, _ = inner.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if inner.poll() is None:
            os.killpg(inner.pid, signal.SIGKILL)
            inner.wait()
        for pid in owned:
            if psutil.pid_exists(pid):
                os.kill(pid, signal.SIGKILL)
    assert inner.returncode == 2, out  # pytest's "interrupted"
    assert took < 30, f"the run took {took:.1f}s to stop:\n{out}"
    for name in names:
        assert (marks / f"torn-{name}").exists(), f"test_{name}'s teardown did not finish:\n{out}"
    assert not [pid for pid in owned if psutil.pid_exists(pid)]
    assert "SystemExit" not in out and "INTERNALERROR" not in out, out
