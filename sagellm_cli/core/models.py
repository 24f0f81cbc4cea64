"""Typed records kept in the state file: engines, GPU reservations, the gateway."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

from sagellm_cli.core.credentials import redact_argv, redact_env

if TYPE_CHECKING:  # the annotations below are strings; pydantic resolves them on demand
    from pydantic import Field

# Statuses: starting -> ready (<-> unhealthy) -> stopping -> stopped; failed at any point.
LIVE_STATUSES = frozenset({"starting", "ready", "unhealthy", "stopping"})
ROLES: tuple[str, ...] = ("general", "prefill", "decode")


# Engine and label names: letters, digits, `.`, `_` and `-`, starting with a letter or digit.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
# Marks EngineSpec fields that sagellm fills in itself (never from a user, a file or the API).
INTERNAL = {"internal": True}


@dataclass
class EngineSpec:
    """What the user asked for: everything needed to (re)start an engine.

    This is the one definition of an engine's options. The annotations are pydantic
    constraints, kept as strings (never evaluated on import, so `engine list` stays
    cheap); `core/spec_schema.py` turns them into the strict model that validates
    presets, the management API and `engine start` alike.
    """

    model: Annotated[str, Field(min_length=1)]
    kind: Literal["llm", "embedding"] = "llm"
    runtime: Literal["vllm", "sentence-transformers"] | None = None
    use_gpu: bool | None = None
    tensor_parallel: Annotated[int, Field(ge=1)] = 1
    pipeline_parallel: Annotated[int, Field(ge=1)] = 1
    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    host: Annotated[str, Field(min_length=1)] = "127.0.0.1"
    label: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    served_model_name: Annotated[str, Field(min_length=1)] | None = None
    max_model_len: Annotated[int, Field(ge=1)] | None = None
    kv_cache_gb: Annotated[float, Field(gt=0)] | None = None
    gpu_memory_gb: Annotated[float, Field(gt=0)] | None = None
    gpus: list[Annotated[int, Field(ge=0)]] | None = None
    placement: Literal["pack", "spread"] = "pack"
    extra_args: list[str] = field(default_factory=list)
    env: dict[Annotated[str, Field(pattern=ENV_NAME_PATTERN)], str] = field(default_factory=dict)
    role: Literal["general", "prefill", "decode"] = "general"
    cost_per_1k_tokens: Annotated[float, Field(ge=0)] | None = None
    max_inflight: Annotated[int, Field(ge=1)] | None = None
    preset: str | None = field(default=None, metadata=INTERNAL)
    preset_engine: str | None = field(default=None, metadata=INTERNAL)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict for JSON, secrets included (the state file, comparisons)."""
        return dataclasses.asdict(self)

    def public_dict(self) -> dict[str, Any]:
        """`to_dict()` with secret env values and flag values masked, for output."""
        return redact_spec(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineSpec:
        """Build from a dict, ignoring keys this version does not know."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def redact_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A spec dict with env values and secret flag values masked (see core/credentials.py)."""
    if not spec:
        return spec
    out = dict(spec)
    out["env"] = redact_env(spec.get("env") or {})
    out["extra_args"] = redact_argv(list(spec.get("extra_args") or []))
    return out


def option_fields() -> tuple[str, ...]:
    """The EngineSpec fields a user sets (CLI options, preset keys, API body fields)."""
    return tuple(f.name for f in dataclasses.fields(EngineSpec) if not f.metadata.get("internal"))


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

    def to_state(self) -> dict[str, Any]:
        """The record as the state file keeps it (plus `url`), secrets included."""
        data = dataclasses.asdict(self)
        data["url"] = self.url
        return data

    def to_dict(self) -> dict[str, Any]:
        """The `--json` and API shape: `to_state()` with secrets masked."""
        data = self.to_state()
        data["command"] = redact_argv(self.command)
        data["spec"] = redact_spec(self.spec)
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
