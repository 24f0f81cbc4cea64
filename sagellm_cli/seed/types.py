"""The seeds' data types (seed 002, "Types"), with their fields and defaults.

They describe requests and instances; `ControlPlaneManager` turns them into the
project's own calls (a registration, a gateway request with its headers).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sagellm_cli.core.errors import BadInput

_E = TypeVar("_E", bound=enum.Enum)


def _parse_member(cls: type[_E], value: object, what: str) -> _E:
    """A member of `cls` from itself, its name or its value (any case); BadInput otherwise."""
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        for member in cls:
            if value.lower() in (member.value, member.name.lower()):
                return member
    names = ", ".join(m.value for m in cls)
    raise BadInput(f"unknown {what} {value!r}", hint=f"use one of {names}")


class RequestPriority(str, enum.Enum):
    """A request's priority; the value is the gateway's `X-Priority` header."""

    CRITICAL = "critical"
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @classmethod
    def parse(cls, value: RequestPriority | str) -> RequestPriority:
        """A member from itself, its name or its value (any case); BadInput otherwise."""
        return _parse_member(cls, value, "request priority")


class ExecutionInstanceType(str, enum.Enum):
    """What an instance is tuned for; becomes the engine's `role` for `length` routing."""

    GENERAL = "general"
    PREFILLING = "prefilling"
    DECODING = "decoding"

    @property
    def role(self) -> str:
        """The engine role (core.records.ROLES) this type routes as."""
        return {"general": "general", "prefilling": "prefill", "decoding": "decode"}[self.value]

    @classmethod
    def parse(cls, value: ExecutionInstanceType | str) -> ExecutionInstanceType:
        """A member from itself, its name or its value (any case: "PREFILLING", "decoding")."""
        return _parse_member(cls, value, "instance_type")


@dataclass
class PrefillingConfig:
    """Tuning of a prefilling instance. Kept with the instance, for information: an
    instance here is an engine something else started, so these are not applied."""

    target_batch_size: int = 64
    tensor_parallel_size: int = 1
    enable_chunked_prefill: bool = True


@dataclass
class DecodingConfig:
    """Tuning of a decoding instance: `max_parallel_requests` becomes the gateway's
    in-flight limit for it; `target_latency_ms` is kept for information."""

    target_latency_ms: float = 50.0
    max_parallel_requests: int = 200


@dataclass
class ParallelismConfig:
    """TP/PP/DP/EP sizes, or `auto_optimize` (the engine's GPU planner picks TP/PP when
    an engine is started with no `tensor_parallel`; `sage llm gpu plan` shows the choice)."""

    auto_optimize: bool = True
    supported_strategies: list[str] = field(
        default_factory=lambda: ["TP", "PP", "DP", "EP", "Hybrid"]
    )
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    expert_parallel_size: int = 1


@dataclass
class PDSeparationConfig:
    """Seed 001/002's PD separation. Without `kv_connector`: prompts over
    `prefilling_threshold_input_tokens` tokens go to PREFILLING instances, the others to
    DECODING ones (the gateway's `length` routing, whole requests; `routing_policy`
    "threshold" and "adaptive" both mean this threshold here). With `kv_connector`
    ("NixlConnector": the instances run vLLM with it): real P/D disaggregation, every
    request prefilled on a PREFILLING instance and decoded on a DECODING one with the
    KV transferred (the gateway's `pd` routing, docs/routing.md); the threshold is unused."""

    enabled: bool = True
    routing_policy: str = "adaptive"
    prefilling_threshold_input_tokens: int = 800
    kv_connector: str | None = None

    def __post_init__(self) -> None:
        threshold = self.prefilling_threshold_input_tokens
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise BadInput(
                f"prefilling_threshold_input_tokens must be a positive integer, not {threshold!r}"
            )
        from sagellm_cli.core.records import KV_CONNECTORS

        if self.kv_connector is not None and self.kv_connector not in KV_CONNECTORS:
            raise BadInput(
                f"kv_connector must be one of {', '.join(KV_CONNECTORS)}, "
                f"not {self.kv_connector!r}",
                hint="or None for length routing",
            )


@dataclass
class RequestMetadata:
    """One request as the seeds submit it. An empty `request_id` gets one at submit.
    `model_name` None: the model of the registered instances, when there is one."""

    request_id: str = ""
    user_id: str | None = None
    priority: RequestPriority = RequestPriority.NORMAL
    slo_deadline_ms: float | None = None
    max_tokens: int = 512
    prompt: str = ""
    model_name: str | None = None
    cost_budget: float | None = None
    parallelism_hint: str | None = None
    temperature: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # more OpenAI body fields


@dataclass
class ExecutionInstance:
    """An inference server the control plane routes to (`http://host:port`, serving
    `model_name`). Registering one records an external engine (`sage llm engine register`).
    The parallelism sizes and `gpu_count` describe the server; they are kept, not applied."""

    instance_id: str
    host: str = "localhost"
    port: int = 8000
    model_name: str = ""
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    expert_parallel_size: int = 1
    gpu_count: int = 1
    instance_type: ExecutionInstanceType | str = ExecutionInstanceType.GENERAL
    health_status: str = "healthy"
    max_concurrent_requests: int = 100
    prefilling_config: PrefillingConfig | None = None
    decoding_config: DecodingConfig | None = None
    kind: str = "llm"  # "embedding" for an embedding server (seed 003's engine kinds)

    def __post_init__(self) -> None:
        self.instance_type = ExecutionInstanceType.parse(self.instance_type)
        if not isinstance(self.instance_id, str) or not self.instance_id:
            raise BadInput("an ExecutionInstance needs an instance_id", hint='e.g. "vllm-1"')

    @property
    def url(self) -> str:
        """The server's base URL."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def max_inflight(self) -> int:
        """The gateway's in-flight limit for it (the decoding config's, else the instance's)."""
        if self.decoding_config is not None:
            return self.decoding_config.max_parallel_requests
        return self.max_concurrent_requests
