"""Parsers for supervision options, shared by the CLI, presets and the management API.

They are pydantic "before" validators too (see EngineSpec), so a preset's `keep_alive: 5m`
and `--keep-alive 5m` are read by the same function.
"""

from __future__ import annotations

import math
from typing import Any

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = r"(\d+(?:\.\d+)?)(ms|s|m|h|d)"  # compiled on first use: records imports this module


def parse_duration(value: Any) -> Any:
    """Seconds from `300`, `"300"`, `"5m"`, `"1h30m"`, `"250ms"`; any negative means never (-1).

    Like Ollama's keep_alive. A string it cannot read raises ValueError (pydantic reports
    it against the field); other types are returned for the type check after it.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            return value
        return -1.0 if value < 0 else float(value)
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    try:
        return parse_duration(float(text))
    except ValueError:
        pass
    seconds = _seconds(text.removeprefix("-"))
    if seconds is None:
        raise ValueError(
            f"{value!r} is not a duration: use e.g. 30s, 5m, 1h30m, 0, or -1 for never"
        )
    return -1.0 if text.startswith("-") else seconds


def _seconds(text: str) -> float | None:
    import re

    parts = re.findall(_PART, text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNITS[u] for n, u in parts)


def format_duration(seconds: float) -> str:
    """`-1` -> `never`, 300 -> `5m`, 90 -> `1m30s` (for tables)."""
    if seconds < 0:
        return "never"
    whole = int(seconds)
    if whole != seconds or whole < 60:
        return f"{seconds:g}s"
    minutes, secs = divmod(whole, 60)
    hours, minutes = divmod(minutes, 60)
    out = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "")
    return out + (f"{secs}s" if secs else "")


def restart_policy(value: Any) -> Any:
    """YAML reads an unquoted `restart: no` as false (as docker compose users find out)."""
    return "no" if value is False else value
