"""The single state file: locked read-modify-write, atomic replace, strict parsing.

Both the CLI and the gateway read this file; it is the only source of truth.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sagellm_cli.core import paths
from sagellm_cli.core.errors import StateCorrupted
from sagellm_cli.core.records import (
    AppliedPreset,
    EngineRecord,
    GatewayRecord,
    GpuReservation,
    decode,
)

STATE_VERSION = 1


@dataclass
class State:
    """The decoded state file."""

    engines: dict[str, EngineRecord] = field(default_factory=dict)
    reservations: dict[str, GpuReservation] = field(default_factory=dict)
    presets: dict[str, AppliedPreset] = field(default_factory=dict)
    gateway: GatewayRecord | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON document written to disk."""
        return {
            "version": STATE_VERSION,
            "engines": {k: v.to_state() for k, v in self.engines.items()},
            "reservations": {k: v.to_dict() for k, v in self.reservations.items()},
            "presets": {k: v.to_dict() for k, v in self.presets.items()},
            "gateway": self.gateway.to_dict() if self.gateway else None,
        }

    def release(self, engine_id: str) -> None:
        """Drop the GPU reservation of one engine, if any."""
        self.reservations.pop(engine_id, None)

    def taken_ports(self, *, exclude: set[str] = frozenset()) -> set[int]:
        """Ports held by live engines (except `exclude`) and by the gateway."""
        taken = set()
        for r in self.engines.values():
            if r.is_live and r.id not in exclude and not r.is_external:  # ports elsewhere
                taken.update(p for p in (r.port, r.kv_events_port, r.nixl_port) if p)
        if self.gateway:
            taken.add(self.gateway.port)
        return taken


def _corrupt(path: Path, why: str) -> StateCorrupted:
    return StateCorrupted(
        f"state file {path} is unreadable: {why}",
        hint="fix it by hand or move it aside; sagellm did not change it",
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


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
    if not isinstance(presets, dict):
        raise _corrupt(path, "'presets' must be an object")
    for key, value in engines.items():
        try:
            engine_id = value.get("id") if isinstance(value, dict) else None
            if not isinstance(engine_id, str) or not _ENGINE_ID.fullmatch(engine_id):
                raise ValueError(f"bad engine id {_short(engine_id)}")
            state.engines[key] = decode(EngineRecord, value)
        except ValueError as exc:
            raise _corrupt(path, f"engine record {_short(key)} is malformed ({exc})") from None
    for what, table, cls, target in (
        ("GPU reservation", reservations, GpuReservation, state.reservations),
        ("preset", presets, AppliedPreset, state.presets),
    ):
        for key, value in table.items():
            try:
                target[key] = decode(cls, value)
            except ValueError as exc:
                raise _corrupt(path, f"{what} {_short(key)} is malformed ({exc})") from None
    gateway = raw.get("gateway")
    if isinstance(gateway, dict):  # anything else means "no gateway"
        try:
            state.gateway = decode(GatewayRecord, gateway)
        except ValueError as exc:
            raise _corrupt(path, f"the gateway record is malformed ({exc})") from None
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
        paths.trusted_dir(self.path.parent)  # never a state dir others can write to
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
