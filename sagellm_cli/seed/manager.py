"""Seed 001/002's `ControlPlaneManager`: `ControlPlane` with the seeds' constructor, types
and coroutines. Nothing here schedules or routes: instances become registrations,
requests become gateway requests, and the gateway (its `--scheduling` policy, its
`--routing` strategy) does the rest, as for every other client.
"""

from __future__ import annotations

import asyncio
import uuid
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sagellm_cli.core.errors import BadInput
from sagellm_cli.library import ControlPlane, InferenceResult, RequestStatus
from sagellm_cli.seed.types import (
    ExecutionInstance,
    PDSeparationConfig,
    RequestMetadata,
    RequestPriority,
)

if TYPE_CHECKING:
    import os

    from sagellm_cli.core.records import EngineRecord
    from sagellm_cli.gateway.telemetry.stats import GatewayMetrics
    from sagellm_cli.library import GatewayHandle

# Managers whose gateway runs, so that a test (or atexit code) can stop them all.
_LIVE: weakref.WeakSet[ControlPlaneManager] = weakref.WeakSet()
# vLLM SamplingParams attributes that are OpenAI request fields of the same name.
_SAMPLING_FIELDS = (
    "n", "temperature", "top_p", "top_k", "min_p", "max_tokens", "min_tokens", "seed", "stop",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos", "logprobs",
)  # fmt: skip


@dataclass(frozen=True)
class RequestState:
    """`get_request_status`'s answer: `state` (RUNNING, COMPLETED, FAILED; equal to the
    strings "running", "completed", "failed"), the `output` text once completed, the
    `error` message once failed, and the whole `result`."""

    request_id: str
    state: RequestStatus
    output: str | None = None
    error: str | None = None
    result: InferenceResult | None = field(default=None, repr=False)


@dataclass(frozen=True)
class PerformanceMetrics:
    """`get_metrics()`: the seeds' PerformanceMetrics names over the gateway's window.
    Counts are over the window (at most 600 s), not since start; a figure with no data
    yet is 0 (and compliance 1.0), so the seeds' format strings always work."""

    total_requests: int  # completed + failed + running + queued
    completed_requests: int
    failed_requests: int
    active_requests: int  # running on an engine now
    queued_requests: int
    avg_latency_ms: float
    p95_latency_ms: float
    p99_latency_ms: float
    tokens_per_second: float  # output tokens
    requests_per_second: float
    slo_violations: int
    slo_compliance_rate: float
    avg_gpu_utilization: float  # 0..1, NVML's mean over GPUs; 0.0 without GPUs
    window_s: float
    gateway: GatewayMetrics = field(repr=False)

    @property
    def throughput(self) -> float:
        """Requests per second (seed 001's `metrics.throughput`)."""
        return self.requests_per_second

    @property
    def avg_latency(self) -> float:
        """`avg_latency_ms` (seed 001's `metrics.avg_latency`)."""
        return self.avg_latency_ms

    @classmethod
    def build(cls, metrics: GatewayMetrics, gpu_utilization: float) -> PerformanceMetrics:
        """From the gateway's aggregates and the GPUs' mean utilization."""
        total = metrics.total
        return cls(
            total_requests=total.completed + total.failed + total.inflight + total.queue_depth,
            completed_requests=total.completed,
            failed_requests=total.failed,
            active_requests=total.inflight,
            queued_requests=total.queue_depth,
            avg_latency_ms=total.latency_ms.mean or 0.0,
            p95_latency_ms=total.latency_ms.p95 or 0.0,
            p99_latency_ms=total.latency_ms.p99 or 0.0,
            tokens_per_second=total.output_tokens_per_s,
            requests_per_second=total.requests_per_s,
            slo_violations=metrics.slo_violations,
            slo_compliance_rate=1.0 if total.slo_compliance is None else total.slo_compliance,
            avg_gpu_utilization=gpu_utilization,
            window_s=metrics.window_s,
            gateway=metrics,
        )


def sampling_body(sampling_params: Any) -> dict[str, Any]:
    """OpenAI body fields from a vLLM `SamplingParams` (or a dict of them): the set ones
    among `_SAMPLING_FIELDS` (None, an empty stop list and top_k <= 0 mean unset)."""
    if sampling_params is None:
        return {}
    if isinstance(sampling_params, dict):
        return dict(sampling_params)
    body: dict[str, Any] = {}
    for name in _SAMPLING_FIELDS:
        value = getattr(sampling_params, name, None)
        if value is None or value == [] or (name == "top_k" and value <= 0):
            continue
        body[name] = value
    return body


class ControlPlaneManager(ControlPlane):
    """`ControlPlane` under seed 001/002's name and signatures (docs/library.md has the
    table). `start()` runs the gateway in this process with `scheduling_policy` and
    `routing_strategy` (seed names accepted; PD separation is `length` routing with
    the token threshold, or with `pd_config.kv_connector` the `pd` routing of real P/D); `register_instance(ExecutionInstance)` records an external
    engine; `await submit_request(RequestMetadata)` returns the request id, and
    `get_request_status` / `wait_for_result` give its outcome. `stop()` stops the gateway
    and unregisters the instances this manager registered (engines keep running)."""

    def __init__(
        self,
        scheduling_policy: str = "adaptive",
        routing_strategy: str = "load_balanced",
        enable_pd_separation: bool = False,
        enable_monitoring: bool = True,
        enable_auto_scaling: bool = False,
        pd_config: PDSeparationConfig | None = None,
        *,
        home: str | os.PathLike[str] | None = None,
        port: int = 0,
        **gateway_options: Any,
    ):
        if enable_auto_scaling:  # the seed says so too: "not supported yet"
            raise BadInput("enable_auto_scaling is not supported",
                           hint="start engines yourself, or keep_alive for load on demand "
                           "(docs/supervisor.md)")  # fmt: skip
        if pd_config is not None and not isinstance(pd_config, PDSeparationConfig):
            raise BadInput(f"pd_config must be a PDSeparationConfig, not {pd_config!r}")
        super().__init__(home)
        self.scheduling_policy = scheduling_policy
        self.enable_monitoring = enable_monitoring  # the gateway always keeps metrics
        self.enable_auto_scaling = False
        self.pd_config = pd_config or PDSeparationConfig(enabled=enable_pd_separation)
        self.enable_pd_separation = bool(enable_pd_separation and self.pd_config.enabled)
        self.routing_strategy = routing_strategy
        if self.enable_pd_separation and self.pd_config.kv_connector:  # prefill, KV, decode
            self.routing_strategy = "pd"
        elif self.enable_pd_separation:  # whole-request routing by prompt tokens
            self.routing_strategy = "length"
            threshold = self.pd_config.prefilling_threshold_input_tokens
            gateway_options.setdefault("length_threshold_tokens", threshold)
        self.instances: dict[str, ExecutionInstance] = {}
        self._registered: dict[str, str] = {}  # instance_id -> engine id
        self._port = port
        self._options = gateway_options

    # -- instances ---------------------------------------------------------------

    def register_instance(
        self, instance: ExecutionInstance | str, model: str | None = None, kind: str = "llm",
        **options: Any,
    ) -> EngineRecord:  # fmt: skip
        """Record an `ExecutionInstance` (or a URL, as ControlPlane's) as an external
        engine: label `instance_id`, role from `instance_type`, in-flight limit from
        `max_concurrent_requests` / `decoding_config`. Its URL must list `model_name`
        in /v1/models (any model when `model_name` is empty and it serves one)."""
        if not isinstance(instance, ExecutionInstance):
            return super().register_instance(instance, model, kind, **options)
        role = instance.instance_type.role
        if self.routing_strategy == "pd" and role != "general":  # the instance runs it
            options.setdefault("kv_connector", self.pd_config.kv_connector)
        record = super().register_instance(
            instance.url, instance.model_name or None, instance.kind,
            label=instance.instance_id, role=role,
            max_inflight=instance.max_inflight, **options,
        )  # fmt: skip
        self.instances[instance.instance_id] = instance
        self._registered[instance.instance_id] = record.id
        return record

    def _default_model(self) -> str:
        """The one model the registered instances (else this home's llm engines) serve."""
        if self._registered:
            records = [self.engine(engine_id) for engine_id in self._registered.values()]
        else:
            records = [r for r in self.engines() if r.kind == "llm"]
        models = sorted({r.served_model_name for r in records if r.served_model_name})
        if len(models) == 1:
            return models[0]
        raise BadInput(
            f"the control plane serves {', '.join(models) or 'no model'}: "
            "say which with RequestMetadata(model_name=...)",
            hint="register_instance(ExecutionInstance(...)) first" if not models else None,
        )

    # -- lifetime ----------------------------------------------------------------

    async def start(self) -> GatewayHandle:
        """Start the gateway in this process (the seed's background tasks); idempotent."""
        if self.gateway is not None and self.gateway.running:
            return self.gateway
        handle = await asyncio.to_thread(
            self.serve, self._port, routing=self.routing_strategy,
            scheduling=self.scheduling_policy, background=False, **self._options,
        )  # fmt: skip
        _LIVE.add(self)
        return handle

    async def stop(self) -> None:
        """Stop the gateway, wait for submitted requests, unregister the instances this
        manager registered. Engines keep running."""
        await asyncio.to_thread(self._stop)

    def _stop(self) -> None:
        self.close()
        for instance_id, engine_id in list(self._registered.items()):
            self.stop_engine(engine_id)  # an external engine: only its record goes
            del self._registered[instance_id]
        _LIVE.discard(self)

    # -- requests ----------------------------------------------------------------

    async def submit_request(self, request: RequestMetadata) -> str:  # type: ignore[override]
        """Queue `request` through the gateway (started if needed) and return its id: the
        request's own `request_id`, or a new one when it has none."""
        if not isinstance(request, RequestMetadata):
            raise BadInput(
                "ControlPlaneManager.submit_request takes a RequestMetadata",
                hint="RequestMetadata(prompt=..., max_tokens=...); or ControlPlane."
                "submit_request(prompt) for a handle",
            )
        await self.start()
        request_id = request.request_id or f"req-{uuid.uuid4().hex[:12]}"
        model = request.model_name or await asyncio.to_thread(self._default_model)
        priority = RequestPriority.parse(request.priority)
        params: dict[str, Any] = {"max_tokens": request.max_tokens, **request.extra}
        if request.temperature is not None:
            params["temperature"] = request.temperature
        if request.user_id:  # OpenAI's `user`: the key of `affinity` routing
            params["user"] = request.user_id
        if request.cost_budget is not None:
            params["cost_budget"] = request.cost_budget
        ControlPlane.submit_request(
            self, request.prompt, model=model, priority=priority.value,
            slo_deadline_ms=request.slo_deadline_ms, request_id=request_id, **params,
        )  # fmt: skip
        return request_id

    async def get_request_status(self, request_id: str) -> RequestState:
        """The request's state, with its output or error once it finished."""
        handle = self.request(request_id)
        state = handle.status
        if state is RequestStatus.RUNNING:
            return RequestState(request_id, state)
        exc = handle._future.exception()
        if exc is not None:
            return RequestState(request_id, state, error=str(exc) or type(exc).__name__)
        result = handle._future.result()
        return RequestState(request_id, state, output=result.text, result=result)

    async def wait_for_result(
        self, request_id: str, timeout: float | None = None
    ) -> InferenceResult:
        """The request's result (its error is raised)."""
        future = asyncio.wrap_future(self.request(request_id)._future)
        return await (future if timeout is None else asyncio.wait_for(future, timeout))

    async def process_request(
        self, prompt: str, sampling_params: Any = None, *, model: str | None = None
    ) -> str:
        """Submit `prompt` with vLLM `SamplingParams` (or a dict) and return the text."""
        body = sampling_body(sampling_params)
        max_tokens = body.pop("max_tokens", 512)
        request = RequestMetadata(prompt=prompt, max_tokens=max_tokens, model_name=model,
                                  extra=body)  # fmt: skip
        return (await self.wait_for_result(await self.submit_request(request))).text

    # -- metrics -----------------------------------------------------------------

    def get_metrics(self, window: float = 60.0) -> PerformanceMetrics:
        """The seeds' metric names over the gateway's last `window` seconds."""
        snapshot = self.gpus()
        loads = [g.utilization_gpu_pct for g in snapshot.inventory.gpus]
        loads = [u for u in loads if u is not None]
        utilization = sum(loads) / len(loads) / 100 if loads else 0.0
        return PerformanceMetrics.build(self.metrics(window), utilization)


async def process_request(
    prompt: str,
    sampling_params: Any = None,
    *,
    model: str | None = None,
    base_url: str | None = None,
) -> str:
    """One completion through a gateway (`base_url`, else the running local one) with
    vLLM `SamplingParams` (or a dict); returns the text. `ControlPlaneManager.
    process_request` does the same through its own gateway."""
    from sagellm_cli.client import AsyncUnifiedInferenceClient, UnifiedInferenceClient

    if base_url is None:
        with UnifiedInferenceClient.create() as found:
            base_url = found.base_url
    async with AsyncUnifiedInferenceClient(base_url) as client:
        return await client.generate(prompt, model=model, **sampling_body(sampling_params))


def stop_all() -> None:
    """Stop every ControlPlaneManager of this process whose gateway still runs."""
    for manager in list(_LIVE):
        manager._stop()
