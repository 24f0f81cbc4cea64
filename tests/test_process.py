"""Process groups: spawn, identity by create time, stop of the whole tree."""

from __future__ import annotations

import os
import signal
import sys
import time

import psutil

from sagellm_cli.core.launchers import process

# A parent that forks a child which ignores SIGTERM: the group stop must still leave nothing.
TREE = """
import os, signal, sys, time
pid = os.fork()
if pid == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(600)
    sys.exit(0)
print("child", pid, flush=True)
time.sleep(600)
"""


def _wait_for(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_spawn_and_terminate_whole_group(tmp_path):
    log, exit_file = tmp_path / "e.log", tmp_path / "exit"
    handle = process.spawn_group([sys.executable, "-c", TREE], dict(os.environ), log, exit_file)
    try:
        assert process.is_alive(handle.pid, handle.create_time)
        assert os.getpgid(handle.pid) == handle.pgid
        assert _wait_for(lambda: "child" in log.read_text())
        members = process.group_members(handle.pgid)
        assert len(members) >= 3  # wrapper shell, python parent, forked child
        killed = process.terminate_group(handle.pid, handle.pgid, None, timeout=1.0)
        assert killed >= 1  # the SIGTERM-ignoring child needed SIGKILL
        assert process.group_members(handle.pgid) == []
    finally:
        process.terminate_group(handle.pid, handle.pgid, None, timeout=0.5)


def test_exit_code_is_recorded_after_sigkill(tmp_path):
    log, exit_file = tmp_path / "e.log", tmp_path / "exit"
    handle = process.spawn_group(
        [sys.executable, "-c", "import time; time.sleep(600)"], dict(os.environ), log, exit_file
    )
    try:
        os.kill(handle.pid, signal.SIGKILL)
        assert _wait_for(lambda: process.read_exit_code(exit_file) is not None)
        assert process.read_exit_code(exit_file) == 137
        assert not process.is_alive(handle.pid, handle.create_time)
        assert "exited with code 137" in log.read_text()
    finally:
        process.terminate_group(handle.pid, handle.pgid, None, timeout=0.5)


def test_reused_pid_is_not_taken_for_the_engine():
    me = psutil.Process()
    assert process.is_alive(me.pid, me.create_time())
    assert not process.is_alive(me.pid, me.create_time() - 100.0)
    assert not process.is_alive(None, None)


def test_arguments_never_go_through_a_shell(tmp_path):
    log, exit_file = tmp_path / "e.log", tmp_path / "exit"
    marker = tmp_path / "pwned"
    handle = process.spawn_group(
        [sys.executable, "-c", "import sys; print(sys.argv[1:])", f"; touch {marker}", "$(id)"],
        dict(os.environ),
        log,
        exit_file,
    )
    assert _wait_for(lambda: process.read_exit_code(exit_file) is not None)
    assert not marker.exists()
    assert "$(id)" in log.read_text()
    process.terminate_group(handle.pid, handle.pgid, None, timeout=0.5)


def test_liveness_from_proc_agrees_with_psutil():
    """`is_alive` reads /proc instead of importing psutil (CLI start-up): its create times
    must be psutil's, or every engine would look dead (or a reused pid alive)."""
    import subprocess

    compared = 0
    for proc in psutil.process_iter(["pid", "create_time"]):
        stat = process._proc_stat(proc.info["pid"])
        if stat is None or stat[0] == "X":
            continue
        assert abs(stat[1] - proc.info["create_time"]) < 0.02, proc.info
        compared += 1
    assert compared > 3
    me = psutil.Process()
    assert process.is_alive(me.pid, me.create_time())
    assert not process.is_alive(me.pid, me.create_time() - 10)  # a reused pid
    zombie = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 5
        while psutil.Process(zombie.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not process.is_alive(zombie.pid, None)
    finally:
        zombie.wait()
    assert not process.is_alive(zombie.pid, None)
