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


def tail_summary(path: str | Path, n: int) -> str:
    """The last `n` non-blank lines on one line, ` | `-joined (`-` when there are none):
    what a failed record's `error` quotes."""
    lines = [line.strip() for line in tail_lines(path, n) if line.strip()]
    return " | ".join(lines) or "-"


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


# Lines that start a loading phase in vLLM's log; the last one seen names the phase it is in.
_PHASES = (
    ("loading weights", re.compile(r"^Starting to load model|^Loading weights")),
    ("profiling", re.compile(r"^Memory profiling|^init engine \(profile|profile run")),
    (
        "compiling",
        re.compile(r"^Compiling a graph|^Dynamo bytecode transform|^torch\.compile takes"),
    ),
    ("capturing graphs", re.compile(r"^Capturing CUDA graph|^Graph capturing")),
    ("starting server", re.compile(r"Starting vLLM API server|Waiting for application startup")),
)
_PHASE_LINES = 80


def loading_view(path: str | Path, width: int = 100) -> tuple[str | None, str]:
    """What a progress line shows, from one read of the log's tail: the loading phase
    (`loading weights`, `profiling`, `compiling`, `capturing graphs`, `starting server`, or
    None) and the last message, vLLM's timestamp prefix dropped, cut on the right to
    `width` characters (the start of a message says the most)."""
    messages = _messages(path, _PHASE_LINES)
    return _phase_of(messages), _last_message(messages, width)


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
