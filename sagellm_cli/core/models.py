"""Typed records kept in the state file: engines, GPU reservations, the gateway."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Statuses: starting -> ready (<-> unhealthy) -> stopping -> stopped; failed at any point.
LIVE_STATUSES = frozenset({"starting", "ready", "unhealthy", "stopping"})
ROLES: tuple[str, ...] = ("general", "prefill", "decode")


@dataclass
class EngineSpec:
    """What the user asked for: everything needed to (re)start an engine."""

    model: str
    kind: str = "llm"
    runtime: str | None = None
    use_gpu: bool | None = None
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    port: int | None = None
    host: str = "127.0.0.1"
    label: str | None = None
    served_model_name: str | None = None
    max_model_len: int | None = None
    kv_cache_gb: float | None = None
    gpu_memory_gb: float | None = None
    gpus: list[int] | None = None
    placement: str = "pack"
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    preset: str | None = None
    preset_engine: str | None = None
    role: str = "general"
    cost_per_1k_tokens: float | None = None
    max_inflight: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """A plain dict for JSON."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineSpec:
        """Build from a dict, ignoring keys this version does not know."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class EngineRecord:
    """One engine as the state file knows it. `url` is what the gateway routes to."""

    id: str
    kind: str
    runtime: str
    model: str
    served_model_name: str
    host: str
    port: int
    label: str | None = None
    status: str = "starting"
    pid: int | None = None
    pgid: int | None = None
    pid_create_time: float | None = None
    gpus: list[int] = field(default_factory=list)
    gpu_memory_gb: float | None = None
    cpu_cores: list[int] = field(default_factory=list)
    created_at: float = 0.0
    started_at: float | None = None
    ready_at: float | None = None
    stopped_at: float | None = None
    log_path: str = ""
    exit_code: int | None = None
    error: str | None = None
    preset: str | None = None
    role: str = "general"
    node: str = "local"
    command: list[str] = field(default_factory=list)
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The engine's routable base URL (no `/v1`)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def is_live(self) -> bool:
        """True while the engine is meant to be running."""
        return self.status in LIVE_STATUSES

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape used in the state file and in `--json` output."""
        data = dataclasses.asdict(self)
        data["url"] = self.url
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineRecord:
        """Build from the state file; raises KeyError/TypeError on a bad record."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class GpuReservation:
    """GPU memory held for one engine: the same GiB on each listed GPU."""

    engine_id: str
    gpus: list[int]
    gib_per_gpu: float
    mock: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A plain dict for JSON."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GpuReservation:
        """Build from the state file."""
        return cls(
            engine_id=str(data["engine_id"]),
            gpus=[int(g) for g in data["gpus"]],
            gib_per_gpu=float(data["gib_per_gpu"]),
            mock=bool(data.get("mock", False)),
        )
