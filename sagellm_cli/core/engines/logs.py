"""Reading engine logs: tails, the last line, and follow mode."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# vLLM's prefix: `(EngineCore_DP0 pid=12) INFO 11-29 22:51:46 [core.py:93] ` (the process
# tag is optional); what a person wants to see is the message after it.
_VLLM_PREFIX = re.compile(
    r"^(?:\([^)]*\)\s+)?(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+"
    r"\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?\s+(?:\[[^\]]*\]\s+)?"
)
_TAIL_CHUNK = 64 * 1024


def tail_lines(path: str | Path, n: int) -> list[str]:
    """The last `n` lines of a file (fewer if it is shorter; none if missing)."""
    if n <= 0:
        return []
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            data = b""
            pos = size
            while pos > 0 and data.count(b"\n") <= n:
                step = min(_TAIL_CHUNK, pos)
                pos -= step
                fh.seek(pos)
                data = fh.read(step) + data
    except FileNotFoundError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    return [_ANSI.sub("", line) for line in lines[-n:]]


# The last line of a Python traceback: `OSError: ...`, `torch.OutOfMemoryError: ...`.
_EXCEPTION = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit)(?::.*)?$")
# A wrapper's summary that points back at the real cause (vLLM's EngineCore start-up).
_SEE_ABOVE = re.compile(r"see (?:the )?root cause above", re.IGNORECASE)


# pydantic's `ValidationError: 1 validation error for ModelConfig` says what failed on
# the next line.
_CONTINUED = re.compile(r"validation errors? for \w+$")


def failure_cause(lines: list[str], width: int = 240) -> str | None:
    """The exception that ended a process, from its log's last lines: the last traceback's
    final line, or the one before it when that only says to look above; None if none."""
    clean = [_VLLM_PREFIX.sub("", _ANSI.sub("", raw)).strip() for raw in lines]
    found: list[str] = []
    for i, line in enumerate(clean):
        if not _EXCEPTION.match(line):
            continue
        if _CONTINUED.search(line) and i + 1 < len(clean) and clean[i + 1]:
            line = f"{line}: {clean[i + 1]}"
        if not found or found[-1] != line:
            found.append(line)
    while len(found) > 1 and _SEE_ABOVE.search(found[-1]):
        found.pop()
    if not found:
        return None
    cause = found[-1]
    return cause if len(cause) <= width else cause[: width - 3] + "..."


# How far back a log is searched for the exception that ended its process (a chained
# vLLM start-up failure puts its root cause a few dozen lines above the end).
CAUSE_LINES = 40


def cause_and_tail(path: str | Path, n: int) -> tuple[str | None, list[str]]:
    """From one read of a log: the exception that ended its process (None if there is none,
    as after a kill) and its last `n` lines."""
    lines = tail_lines(path, max(CAUSE_LINES, n))
    return failure_cause(lines), lines[-n:] if n > 0 else []


def crash_note(path: str | Path, n: int) -> str:
    """What a failed record's `error` quotes from its log: the exception that ended it, or
    else its last `n` non-blank lines, ` | `-joined."""
    cause, tail = cause_and_tail(path, n)
    if cause:
        return cause
    return "last log lines: " + (" | ".join(line.strip() for line in tail if line.strip()) or "-")


def _messages(path: str | Path, n: int) -> list[str]:
    """The last `n` log lines as messages: stripped, vLLM's timestamp prefix dropped."""
    return [_VLLM_PREFIX.sub("", line.strip()) for line in tail_lines(path, n)]


def _last_message(messages: list[str], width: int) -> str:
    for text in reversed(messages):
        if text:
            return text if len(text) <= width else text[: width - 1] + "…"
    return ""


def _phase_of(messages: list[str]) -> str | None:
    for message in reversed(messages):
        for name, pattern in _PHASES:
            if pattern.search(message):
                return name
    return None


# Lines that start a loading phase in vLLM's log (0.24, as its source words them); the last
# one seen names the phase it is in. In load order:
#   gpu_model_runner.py  "Starting to load model %s..." / loader "Loading weights took %.2f seconds"
#   backends.py          "Dynamo bytecode transform time: %.2f s", "Compiling a graph for
#                        compile range %s takes %.2f s", "Directly load the compiled graph(s)
#                        for compile range %s from the cache, took %.3f s" (warm cache)
#   gpu_worker.py        "Available KV cache memory: %.2f GiB" (profiled), or "... reserved %s
#                        GiB memory for KV Cache as specified by kv_cache_memory_bytes ..."
#   kv_cache_utils.py    "GPU KV cache size: %s tokens" (the cache is allocated right after)
#   gpu_model_runner.py  "Capturing CUDA graphs (mixed prefill-decode, PIECEWISE)" (tqdm),
#                        "Graph capturing finished in %.0f secs, took %.2f GiB"
#   api_server.py        "Starting vLLM API server %d on %s", "Waiting for application startup."
_KV_SIZED = re.compile(r"KV cache size: [\d,]+ tokens")
_PHASES = (
    ("loading weights", re.compile(r"^Starting to load model|^Loading weights")),
    ("profiling", re.compile(r"^Memory profiling|^init engine \(profile|profile run")),
    (
        "compiling",
        re.compile(
            r"^Compiling a graph|^Dynamo bytecode transform|^torch\.compile t(?:akes|ook)"
            r"|^Directly load the compiled graph"
        ),
    ),
    (
        "KV cache",
        re.compile(r"^Available KV cache memory|GiB memory for KV Cache|" + _KV_SIZED.pattern),
    ),
    ("capturing CUDA graphs", re.compile(r"^Capturing CUDA graph|^Graph capturing")),
    ("starting server", re.compile(r"Starting vLLM API server|Waiting for application startup")),
)
_PHASE_LINES = 80


def loading_view(path: str | Path, width: int = 100) -> tuple[str | None, str]:
    """What a progress line shows, from one read of the log's tail: the loading phase
    (`loading weights`, `profiling`, `compiling`, `KV cache`, `capturing CUDA graphs`,
    `starting server`, or
    None) and the last message, vLLM's timestamp prefix dropped, cut on the right to
    `width` characters (the start of a message says the most)."""
    messages = _messages(path, _PHASE_LINES)
    return _phase_of(messages), _last_message(messages, width)


# How far back the current run's KV-cache line is looked for (a compile logs a few hundred).
_RUN_LINES = 4000
_RUN_START = "[sagellm] "


def kv_cache_sized(path: str | Path) -> bool:
    """True once the engine's current run (after sagellm's last `starting engine` line) has
    logged its KV cache size: the point after which a neighbour may start profiling."""
    lines = tail_lines(path, _RUN_LINES)
    for line in reversed(lines):
        if _KV_SIZED.search(line):
            return True
        if line.startswith(_RUN_START) and " starting engine " in line:
            return False
    return False


def follow(path: str | Path, keep_going: Callable[[], bool], poll: float = 0.5) -> Iterator[str]:
    """Yield lines appended to `path` while `keep_going()` is true."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        fh.seek(0, os.SEEK_END)
        idle_checks = 0
        while True:
            line = fh.readline()
            if line:
                yield line.rstrip("\n")
                continue
            idle_checks += 1
            if idle_checks % 2 == 0 and not keep_going():
                yield from (rest.rstrip("\n") for rest in fh.readlines())
                return
            time.sleep(poll)
