"""Process groups: spawn in a new session, check identity, stop the whole tree."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # psutil costs ~8 ms of start-up: imported where a process is looked at
    import psutil


# The shell stays as the engine's parent so that the exit code is recorded even
# when no sagellm process is waiting on the engine. Arguments pass through "$@",
# never through shell parsing.
_WRAPPER = (
    'exec >>"$SAGELLM_LOG_FILE" 2>&1; "$@"; rc=$?; echo "$rc" > "$SAGELLM_EXIT_FILE"; '
    'echo "[sagellm] engine process exited with code $rc"; exit "$rc"'
)
# The launcher shell (a new session) starts the wrapper in the background, prints its
# pid and exits: the engine is then nobody's child, so stopping whoever started it (a
# gateway) never reaches the engine, and the engine outlives it.
_DETACH = '"$@" </dev/null >/dev/null 2>&1 & echo "$!"'
_CREATE_TIME_TOLERANCE = 0.05


@dataclass(frozen=True)
class ProcessHandle:
    """A spawned engine: its main pid, process group and create time (for process
    operations), and the launcher's name for this run of it (for identity)."""

    pid: int
    pgid: int
    create_time: float
    instance: str = ""


def spawn_group(
    argv: list[str], env: dict[str, str], log_path: Path, exit_file: Path, cwd: Path | None = None
) -> ProcessHandle:
    """Start `argv` in a new session, appending stdout and stderr to `log_path`."""
    import subprocess  # spawn path only: keeps `engine list` start-up small

    import psutil

    exit_file.unlink(missing_ok=True)
    full_env = dict(env)
    full_env["SAGELLM_EXIT_FILE"] = str(exit_file)
    full_env["SAGELLM_LOG_FILE"] = str(log_path)
    launcher = subprocess.Popen(
        ["/bin/sh", "-c", _DETACH, "sagellm-launch", "/bin/sh", "-c", _WRAPPER, "sagellm-engine",
         *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=full_env,
        cwd=str(cwd) if cwd else None,
        start_new_session=True,
        close_fds=True,
    )  # fmt: skip
    out, _ = launcher.communicate(timeout=30)
    try:
        wrapper_pid = int(out.strip())
    except ValueError:
        raise OSError(f"the engine launcher failed (exit code {launcher.returncode})") from None
    child = _first_child(wrapper_pid)
    try:
        main = child if child is not None else psutil.Process(wrapper_pid)
        pid, create_time = main.pid, main.create_time()
    except psutil.NoSuchProcess:
        # Already gone: reconcile finds it dead and reads the exit file the wrapper wrote.
        pid, create_time = wrapper_pid, time.time()
    # The launcher led the new session: its pid is the group of every engine process.
    return ProcessHandle(pid=pid, pgid=launcher.pid, create_time=create_time)


def _first_child(pid: int, timeout: float = 3.0) -> psutil.Process | None:
    import psutil

    deadline = time.monotonic() + timeout
    with contextlib.suppress(psutil.NoSuchProcess):
        parent = psutil.Process(pid)
        while time.monotonic() < deadline:
            children = parent.children()
            if children:
                return children[0]
            if parent.status() == psutil.STATUS_ZOMBIE:
                return None
            time.sleep(0.005)
    return None


def is_alive(pid: int | None, create_time: float | None) -> bool:
    """True if `pid` runs and is the same process (not a reused pid)."""
    if not pid:
        return False
    stat = _proc_stat(pid)
    if stat is not None:  # Linux: two small reads, no psutil import (CLI start-up)
        state, started = stat
        if state in ("Z", "X"):
            return False
        return create_time is None or abs(started - create_time) <= _CREATE_TIME_TOLERANCE
    import psutil

    try:
        proc = psutil.Process(pid)
        if (
            create_time is not None
            and abs(proc.create_time() - create_time) > _CREATE_TIME_TOLERANCE
        ):
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _proc_stat(pid: int) -> tuple[str, float] | None:
    """(state letter, create time) from /proc, computed as psutil does on Linux (boot time
    plus the start time in clock ticks); ("X", 0) for a pid that does not exist; None
    where /proc can't answer (not Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return ("X", 0.0) if _boot_time() is not None else None
    except OSError:
        return None
    boot = _boot_time()
    if boot is None:
        return None
    # The command name may hold spaces and parentheses: the fields follow the last ')'.
    fields = data[data.rfind(b")") + 2 :].split()
    return fields[0].decode(), boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


_BOOT_TIME: list[float | None] = []


def _boot_time() -> float | None:
    if not _BOOT_TIME:
        try:
            with open("/proc/stat", "rb") as fh:
                line = next(x for x in fh if x.startswith(b"btime"))
            _BOOT_TIME.append(float(line.split()[1]))
        except (OSError, StopIteration, ValueError, IndexError):
            _BOOT_TIME.append(None)
    return _BOOT_TIME[0]


def group_members(pgid: int | None, not_before: float | None = None) -> list[psutil.Process]:
    """Live processes of a process group, optionally only those created after `not_before`.

    `not_before` guards against a recycled pgid: our engine's processes are never
    older than the engine itself.
    """
    import psutil

    if not pgid:
        return []
    members = []
    for proc in psutil.process_iter(["pid", "create_time", "status"]):
        try:
            if os.getpgid(proc.pid) != pgid:
                continue
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if not_before is not None and proc.info["create_time"] < not_before - 1.0:
                continue
            members.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def engine_processes(handle_pid: int | None, pgid: int | None, not_before: float | None) -> list:
    """The engine's group plus any descendant that left the group (setsid children)."""
    import psutil

    procs = {p.pid: p for p in group_members(pgid, not_before)}
    if handle_pid and handle_pid not in procs:
        # Outside its group, or no group of its own (a gateway run in the foreground shares
        # its shell's): the process itself, not only its children; not a recycled pid.
        with contextlib.suppress(psutil.Error):
            handle = psutil.Process(handle_pid)
            if not_before is None or handle.create_time() >= not_before - 1.0:
                procs[handle_pid] = handle
    roots = list(procs.values())
    for root in roots:
        with contextlib.suppress(psutil.Error):
            for child in root.children(recursive=True):
                procs.setdefault(child.pid, child)
    return [p for p in procs.values() if _running(p)]


def _running(proc: psutil.Process) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def terminate_group(
    pid: int | None, pgid: int | None, not_before: float | None, timeout: float = 30.0
) -> int:
    """SIGTERM the group, wait up to `timeout`, then SIGKILL what remains.

    Returns how many processes had to be killed. On return no process of the
    engine is left.
    """
    import psutil

    procs = engine_processes(pid, pgid, not_before)
    if not procs:
        return 0
    _signal_all(procs, pgid, signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    # A process may have forked during shutdown: look again before the hard kill.
    leftover = {p.pid: p for p in alive}
    for p in engine_processes(pid, pgid, not_before):
        leftover.setdefault(p.pid, p)
    if leftover:
        _signal_all(list(leftover.values()), pgid, signal.SIGKILL)
        psutil.wait_procs(list(leftover.values()), timeout=10)
    return len(leftover)


def _signal_all(procs: list[psutil.Process], pgid: int | None, sig: int) -> None:
    import psutil

    if pgid:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


def read_exit_code(exit_file: Path) -> int | None:
    """The exit code the wrapper wrote, if the engine has exited."""
    try:
        return int(exit_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
