"""One engine as the gateway routes to it: the record plus runtime counters."""

from __future__ import annotations

import hashlib
import time

from sagellm_cli.core.lifecycle import CHECKABLE, SERVING, WAKEABLE
from sagellm_cli.core.records import EngineRecord


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process (unlike `hash()`)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class Backend:
    """One engine as the gateway routes to it."""

    __slots__ = (
        "id",
        "kind",
        "url",
        "served_model_name",
        "names",
        "role",
        "record",
        "healthy",
        "failures",
        "inflight",
        "requests",
        "errors",
        "hash_id",
        "last_check",
        "last_error",
        "last_used",
        "last_probe",
        "probe_failures",
        "hung",
        "draining",
    )

    def __init__(self, record: EngineRecord):
        self.id = record.id
        self.kind = record.kind
        self.url = record.url
        self.served_model_name = record.served_model_name
        # Every name a request's `model` may use to reach this engine.
        self.names = tuple(
            dict.fromkeys(n for n in (record.served_model_name, record.label, record.model) if n)
        )
        self.role = record.role
        self.record = record
        # Set by the supervisor while generation probes fail although /health answers.
        self.hung = record.unresponsive_since is not None
        # Set while the supervisor unloads or sleeps it: health checks must not heal it.
        self.draining = False
        # A record the lifecycle already saw ready starts healthy; a starting
        # one waits for the first successful active check.
        self.healthy = record.status == SERVING and not self.hung
        self.failures = 0
        self.inflight = 0
        self.requests = 0
        self.errors = 0
        self.hash_id = stable_hash(record.id)
        self.last_check = 0.0
        self.last_error: str | None = None
        # Monotonic time of the last request (keep_alive counts from it) and of the last
        # supervisor probe; a new backend counts as just used.
        self.last_used = time.monotonic()
        self.last_probe = self.last_used
        self.probe_failures = 0

    @property
    def adapters(self) -> tuple[str, ...]:
        """The names of the LoRA adapters the engine serves (as recorded in its spec)."""
        spec = self.record.spec
        return tuple(spec.lora_adapters) if spec is not None else ()

    @property
    def checkable(self) -> bool:
        """True if health checks may put the engine (back) in rotation: its process should
        be up and serving, and the supervisor has not found it hung."""
        return self.record.status in CHECKABLE and not self.hung and not self.draining

    @property
    def wakeable(self) -> bool:
        """True if a request may load this engine (unloaded, unloading or asleep)."""
        return self.record.status in WAKEABLE

    def same_process(self, record: EngineRecord) -> bool:
        """True if `record` still describes the run of the engine this backend talks to."""
        return record.url == self.url and record.instance == self.record.instance

    def to_dict(self) -> dict:
        """Runtime view for the management API."""
        return {
            "id": self.id,
            "kind": self.kind,
            "url": self.url,
            "model": self.served_model_name,
            "names": list(self.names),
            "role": self.role,
            "status": self.record.status,
            "healthy": self.healthy,
            "consecutive_failures": self.failures,
            "inflight": self.inflight,
            "requests": self.requests,
            "errors": self.errors,
            "last_error": self.last_error,
            "idle_s": round(time.monotonic() - self.last_used, 3),
        }
