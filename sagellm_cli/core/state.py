"""The single state file: locked read-modify-write, atomic replace, strict parsing.

Both the CLI and the gateway read this file; it is the only source of truth.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sagellm_cli.core import paths
from sagellm_cli.core.errors import StateCorrupted
from sagellm_cli.core.models import EngineRecord, GpuReservation

STATE_VERSION = 1


@dataclass
class State:
    """The decoded state file."""

    engines: dict[str, EngineRecord] = field(default_factory=dict)
    reservations: dict[str, GpuReservation] = field(default_factory=dict)
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    gateway: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON document written to disk."""
        return {
            "version": STATE_VERSION,
            "engines": {k: v.to_state() for k, v in self.engines.items()},
            "reservations": {k: v.to_dict() for k, v in self.reservations.items()},
            "presets": self.presets,
            "gateway": self.gateway,
        }

    def release(self, engine_id: str) -> None:
        """Drop the GPU reservation of one engine, if any."""
        self.reservations.pop(engine_id, None)


def _corrupt(path: Path, why: str) -> StateCorrupted:
    return StateCorrupted(
        f"state file {path} is unreadable: {why}",
        hint="fix it by hand or move it aside; sagellm did not change it",
    )


# Bounds for numbers read back from the file: a pid is handed to kill(2), where -1 or 0
# would signal every process or our own group, and a huge int overflows C calls.
_PID_RANGE = (1, 2**31 - 1)
_PORT_RANGE = (1, 65535)
_INDEX_RANGE = (0, 2**20)
_INT_RANGE = (-(2**63), 2**63 - 1)
_FLOAT_LIMIT = 1e18
_RANGES: dict[str, tuple[int, int]] = {
    "pid": _PID_RANGE,
    "pgid": _PID_RANGE,
    "port": _PORT_RANGE,
    "gpus": _INDEX_RANGE,
    "cpu_cores": _INDEX_RANGE,
}


def _type_ok(value: Any, hint: Any, bounds: tuple[int, int] = _INT_RANGE) -> bool:
    """True if a decoded JSON value fits a dataclass field type (unknown types pass)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg, bounds) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return hint is Any  # JSON true/false is never a number or a string here
    if hint is int:
        return isinstance(value, int) and bounds[0] <= value <= bounds[1]
    if hint is float:
        if isinstance(value, int):
            return abs(value) <= _FLOAT_LIMIT
        return isinstance(value, float) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, item, bounds) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True  # Any, or a type added later: from_dict decides


def _check_fields(hints: dict[str, Any], value: Any) -> None:
    """Raise ValueError naming the first known field of `value` whose value doesn't fit."""
    if not isinstance(value, dict):
        raise ValueError("not an object")
    for name, item in value.items():
        if name in hints and not _type_ok(item, hints[name], _RANGES.get(name, _INT_RANGE)):
            raise ValueError(f"field {name!r} has a bad value {_short(item)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# The gateway record's fields that are used for signals and binds.
_GATEWAY_FIELDS: dict[str, Any] = {
    "pid": int | None,
    "pgid": int | None,
    "port": int | None,
    "create_time": float | None,
}


# Ids name files and folders that are removed (logs, run dirs, scratch): no path parts.
_ENGINE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# The real document is about 5 levels deep; deeper ones would overflow the encoder later.
_MAX_DEPTH = 32


def _too_deep(value: Any) -> bool:
    """True if `value` nests lists/objects more than _MAX_DEPTH levels (no recursion)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > _MAX_DEPTH:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return False


# The JSON types of EngineRecord's and GpuReservation's fields, spelt out here rather than
# read from models.py's annotations (which are strings and may carry pydantic constraints).
# A field missing here is left to from_dict.
_STR, _OPT_STR, _OPT_INT, _OPT_FLOAT = str, str | None, int | None, float | None
_RECORD_FIELDS: dict[str, Any] = {
    **dict.fromkeys(("id", "kind", "runtime", "model", "served_model_name", "host"), _STR),
    **dict.fromkeys(("status", "log_path", "role", "node"), _STR),
    **dict.fromkeys(("label", "error", "preset"), _OPT_STR),
    **dict.fromkeys(("pid", "pgid", "exit_code"), _OPT_INT),
    "port": int,
    **dict.fromkeys(("pid_create_time", "gpu_memory_gb"), _OPT_FLOAT),
    **dict.fromkeys(("started_at", "ready_at", "stopped_at"), _OPT_FLOAT),
    "created_at": float,
    **dict.fromkeys(("gpus", "cpu_cores"), list[int]),
    "command": list[str],
    "spec": dict,
}
_RESERVATION_FIELDS: dict[str, Any] = {
    "engine_id": str,
    "gpus": list[int],
    "gib_per_gpu": float,
    "mock": bool,
}


def decode_state(text: str, path: Path) -> State:
    """Parse and validate the state document; raise StateCorrupted naming the file.

    An empty file is corrupt too: sagellm never writes one (writes are atomic renames).
    """
    if not text:
        raise _corrupt(path, "the file is empty")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _corrupt(path, f"invalid JSON at line {exc.lineno} column {exc.colno}") from None
    except ValueError:  # Python refuses integers of more than 4300 digits
        raise _corrupt(path, "invalid JSON: a number has too many digits") from None
    except RecursionError:
        raise _corrupt(path, "JSON nested too deeply") from None
    if not isinstance(raw, dict):
        raise _corrupt(path, "the top level is not a JSON object")
    if _too_deep(raw):
        raise _corrupt(path, f"JSON nested more than {_MAX_DEPTH} levels deep")
    version = raw.get("version", STATE_VERSION)
    if type(version) is not int or version != STATE_VERSION:
        raise _corrupt(
            path, f"unsupported version {_short(version)} (this sagellm reads {STATE_VERSION})"
        )
    state = State()
    engines = raw.get("engines", {})
    reservations = raw.get("reservations", {})
    presets = raw.get("presets", {})
    if not isinstance(engines, dict) or not isinstance(reservations, dict):
        raise _corrupt(path, "'engines' and 'reservations' must be objects")
    if not isinstance(presets, dict) or not all(isinstance(v, dict) for v in presets.values()):
        raise _corrupt(path, "'presets' must be an object of objects")
    for key, value in engines.items():
        try:
            _check_fields(_RECORD_FIELDS, value)
            if not _ENGINE_ID.fullmatch(value.get("id", "")):
                raise ValueError(f"bad engine id {_short(value.get('id'))}")
            state.engines[key] = EngineRecord.from_dict(value)
        except (KeyError, TypeError, ValueError) as exc:
            raise _corrupt(path, f"engine record {_short(key)} is malformed ({exc})") from None
    for key, value in reservations.items():
        try:
            _check_fields(_RESERVATION_FIELDS, value)
            state.reservations[key] = GpuReservation.from_dict(value)
        except (KeyError, TypeError, ValueError) as exc:
            raise _corrupt(path, f"GPU reservation {_short(key)} is malformed ({exc})") from None
    state.presets = presets
    gateway = raw.get("gateway")
    try:
        if isinstance(gateway, dict):  # anything else means "no gateway"
            _check_fields(_GATEWAY_FIELDS, gateway)
    except ValueError as exc:
        raise _corrupt(path, f"the gateway record is malformed ({exc})") from None
    state.gateway = gateway if isinstance(gateway, dict) else None
    return state


def _serialise(state: State) -> str:
    return json.dumps(state.to_dict(), indent=2, sort_keys=True) + "\n"


class StateStore:
    """Locked, atomic access to the state file.

    A separate lock file is used so that the atomic rename of the state file
    never invalidates a lock someone else holds.
    """

    def __init__(self, path: Path | None = None):
        self.path = path or paths.state_file()
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        paths.ensure_private_dir(self.path.parent)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def _read_unlocked(self) -> State:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return State()
        except UnicodeDecodeError:
            raise _corrupt(self.path, "not UTF-8 text") from None
        except OSError as exc:  # a directory, no permission, an I/O error
            raise _corrupt(self.path, exc.strerror or type(exc).__name__) from None
        return decode_state(text, self.path)

    def _write_unlocked(self, data: str) -> None:
        import tempfile  # only writers pay for it

        fd, tmp = tempfile.mkstemp(prefix=".state-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def read(self) -> State:
        """A consistent snapshot, without reconciling."""
        with self._locked(exclusive=False):
            return self._read_unlocked()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[State]:
        """Exclusive read-modify-write; the file is rewritten only if the state changed."""
        with self._locked(exclusive=True):
            state = self._read_unlocked()
            # Serialised, so that in-place edits of nested dicts are seen as changes too.
            before = _serialise(state)
            yield state
            after = _serialise(state)
            if after != before or not self.path.exists():
                self._write_unlocked(after)

    def mtime_ns(self) -> int:
        """The state file's modification time, for cheap change detection (0 if absent)."""
        try:
            return self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return 0
