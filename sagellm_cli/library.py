"""`ControlPlane`: the project as a Python library, a facade over the core the CLI calls.

    from sagellm_cli import ControlPlane

    cp = ControlPlane()
    engine = cp.start_engine("./tiny", served_model_name="tiny")      # waits until ready
    with cp.serve(background=False) as gw:                            # a gateway in a thread
        print(cp.submit_request("Hello", model="tiny", priority="high").result(60).text)
        print(cp.metrics().total.latency_ms.p95)
    cp.stop_engine(engine.id)

Every method is the CLI's code path, not a second implementation: engines through
`core.engines.manager.EngineManager`, presets through `core.presets`, GPUs through `core.gpu`,
the gateway through `gateway.http.app` (in a thread, `gateway.embedded`) or `gateway.daemon`.
Errors are the project's typed exceptions (`BadInput`, `NotFound`, `ResourceUnavailable`,
`OperationFailed`, all `SageError`s with `.message`, `.hint`, `.exit_code`); nothing prints.
docs/library.md is the guide.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import itertools
import os
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sagellm_cli.core import protocol
from sagellm_cli.core.errors import BadInput, NotFound, OperationFailed

if TYPE_CHECKING:
    from sagellm_cli.client import UnifiedInferenceClient
    from sagellm_cli.core.engines.manager import EngineManager
    from sagellm_cli.core.gpu import GpuSnapshot
    from sagellm_cli.core.presets import ApplyResult, PresetPlan
    from sagellm_cli.core.records import EngineRecord
    from sagellm_cli.gateway.embedded import ThreadedGateway
    from sagellm_cli.gateway.telemetry.stats import GatewayMetrics

# Open ControlPlanes that set $SAGELLM_HOME (the core reads it everywhere, per process).
_HOME_LOCK = threading.Lock()
_HOME_USERS: weakref.WeakSet[ControlPlane] = weakref.WeakSet()
# Requests whose status `get_request_status` can still report, per ControlPlane.
_KEPT_REQUESTS = 1024
_request_ids = itertools.count(1)


def _use_home(plane: ControlPlane, home: str | os.PathLike[str] | None) -> None:
    if home is None:
        return
    path = str(Path(home).expanduser().resolve())
    with _HOME_LOCK:
        for other in list(_HOME_USERS):
            if str(other.home) != path:
                raise BadInput(
                    f"an open ControlPlane of this process uses the state directory {other.home}",
                    hint="one home at a time per process (the core reads $SAGELLM_HOME): "
                    "close() the other one first, or use a subprocess",
                )
        os.environ["SAGELLM_HOME"] = path
        _HOME_USERS.add(plane)


def _timeout(value: float, name: str = "timeout") -> float:
    from sagellm_cli.core.inputs.checks import check_seconds

    return check_seconds(value, name)


# -- the gateway ---------------------------------------------------------------------


class GatewayHandle:
    """A gateway this process started: in a thread (`mode="thread"`) or as the background
    daemon (`mode="daemon"`, what `sage llm serve --background` runs). `stop()` and
    leaving a `with` block stop it; engines are never touched."""

    def __init__(
        self,
        url: str,
        mode: Literal["thread", "daemon"],
        admin_token: str,
        api_key: str | None = None,
        *,
        thread: ThreadedGateway | None = None,
        pid: int | None = None,
    ):
        self.url = url
        self.mode = mode
        self.admin_token = admin_token
        self.api_key = api_key
        self.pid = pid
        self._thread = thread
        self._stopped = False

    @property
    def v1(self) -> str:
        """The OpenAI base URL (`url` + `/v1`)."""
        return protocol.api_base(self.url)

    @property
    def running(self) -> bool:
        """True while the gateway serves."""
        if self._stopped:
            return False
        if self._thread is not None:
            return self._thread.running
        from sagellm_cli.core.engines.monitor import recorded_gateway

        record = recorded_gateway()
        return record is not None and record.pid == self.pid

    def metrics(self, window: float = 60.0) -> GatewayMetrics:
        """Aggregates of the last `window` seconds (`GET /v1/management/metrics`)."""
        from sagellm_cli.core.engines.monitor import fetch_metrics
        from sagellm_cli.gateway.telemetry.stats import GatewayMetrics

        return GatewayMetrics.from_dict(fetch_metrics(self.url, self.admin_token, window))

    def client(self, timeout: float = 600.0) -> UnifiedInferenceClient:
        """A `UnifiedInferenceClient` for this gateway (close it when done)."""
        from sagellm_cli.client import UnifiedInferenceClient

        return UnifiedInferenceClient(self.url, api_key=self.api_key, timeout=timeout)

    def stop(self) -> None:
        """Stop the gateway (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        if self._thread is not None:
            self._thread.stop()
            return
        from sagellm_cli.core.engines.monitor import recorded_gateway
        from sagellm_cli.gateway import daemon

        record = recorded_gateway()
        if record is not None and record.pid == self.pid:  # never another process's gateway
            daemon.stop()

    def __enter__(self) -> GatewayHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"GatewayHandle({self.url!r}, mode={self.mode!r}, {state})"


# -- seed-style requests -------------------------------------------------------------


class RequestStatus(str, enum.Enum):
    """Where a submitted request is (the seeds' RequestStatus, lower-case)."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True)
class InferenceResult:
    """The answer to one `submit_request`."""

    request_id: str
    text: str
    model: str | None
    engine: str | None  # the engine id that served it
    usage: dict[str, Any] | None
    latency_s: float
    finished_at: float  # time.time() when the answer arrived
    response: dict[str, Any] = field(repr=False, default_factory=dict)


class RequestHandle:
    """A submitted request: `result(timeout)`, or `await handle` in async code."""

    def __init__(self, request_id: str, future: Future, priority: str, deadline: float | None):
        self.request_id = request_id
        self.priority = priority
        self.slo_deadline_ms = deadline
        self._future = future

    def done(self) -> bool:
        """True once it completed or failed."""
        return self._future.done()

    @property
    def status(self) -> RequestStatus:
        """running, completed or failed."""
        if not self._future.done():
            return RequestStatus.RUNNING
        failed = self._future.cancelled() or self._future.exception() is not None
        return RequestStatus.FAILED if failed else RequestStatus.COMPLETED

    def result(self, timeout: float | None = None) -> InferenceResult:
        """Wait for the answer; re-raises the request's error (a `GatewayError` subclass:
        429 is ResourceUnavailable, 404 NotFound, ...). OperationFailed on timeout."""
        try:
            return self._future.result(timeout)
        except FutureTimeout:
            raise OperationFailed(
                f"request {self.request_id} did not finish within {timeout}s",
                hint="it is still running; call result() again",
            ) from None

    def __await__(self):
        return asyncio.wrap_future(self._future).__await__()

    def __repr__(self) -> str:
        return f"RequestHandle({self.request_id!r}, {self.status.value})"


# -- the control plane ---------------------------------------------------------------


class ControlPlane:
    """Engines, presets, GPUs and the gateway, from Python (see the module docstring)."""

    def __init__(self, home: str | os.PathLike[str] | None = None):
        """`home` is the state directory ($SAGELLM_HOME; default as for the CLI). It is set
        for the whole process, because the core reads it everywhere."""
        from sagellm_cli.core import paths
        from sagellm_cli.core.engines.manager import EngineManager

        _use_home(self, home)
        self.home = paths.state_dir()
        self.manager: EngineManager = EngineManager()
        self.gateway: GatewayHandle | None = None  # the last one `serve` started
        self._client: UnifiedInferenceClient | None = None
        self._client_url: str | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._requests: collections.OrderedDict[str, RequestHandle] = collections.OrderedDict()
        self._lock = threading.Lock()

    # -- engines -----------------------------------------------------------------

    def start_engine(
        self,
        model: str | os.PathLike[str],
        kind: str = "llm",
        *,
        wait: bool = True,
        timeout: float = 600.0,
        **spec: Any,
    ) -> EngineRecord:
        """Start an engine, as `sage llm engine start`; wait until it is ready unless
        `wait=False`. `spec` takes the same options by their EngineSpec field names
        (`sagellm_cli.core.records.option_fields()`: served_model_name, label, gpus, env,
        ...); an unknown one is BadInput naming it and listing them. A failed load raises
        OperationFailed with the log tail in `.details`."""
        from sagellm_cli.core.inputs.spec_schema import parse_engine_options

        _timeout(timeout)
        options = {"model": os.fspath(model), "kind": kind, **spec}
        engine_spec = parse_engine_options(options, what="engine spec")
        if not wait:  # core decides: load now, or register a lazy engine (keep_alive=0)
            return self.manager.start(engine_spec, wait=False)
        record = self.manager.spawn(engine_spec)
        try:
            return self.manager.wait_ready(record.id, timeout=timeout)
        except KeyboardInterrupt:
            self.manager.stop(record.id)  # as the CLI: an interrupted start leaves nothing
            raise

    def stop_engine(self, id_or_label: str, *, timeout: float = 30.0) -> EngineRecord:
        """Stop an engine's whole process group (a no-op for a stopped one)."""
        return self.manager.stop(id_or_label, timeout=_timeout(timeout))

    def engines(self, all: bool = False) -> list[EngineRecord]:  # noqa: A002 - the CLI's --all
        """Live engines (with `all`, stopped and failed ones too), reconciled with reality."""
        return self.manager.list(include_all=all)

    def engine(self, id_or_label: str) -> EngineRecord:
        """One engine by id, id prefix or label (NotFound if unknown)."""
        return self.manager.get(id_or_label)

    def logs(self, id_or_label: str, lines: int = 50) -> list[str]:
        """The last `lines` lines of an engine's log."""
        from sagellm_cli.core.engines import logs

        if isinstance(lines, bool) or not isinstance(lines, int) or lines < 0:
            raise BadInput(f"lines must be an integer >= 0, not {lines!r}")
        record = self.manager.get(id_or_label, probe_health=False)
        return logs.tail_lines(record.log_path, lines)

    def register_instance(
        self, url: str, model: str | None = None, kind: str = "llm", **options: Any
    ) -> EngineRecord:
        """Route to an engine this machine did not start (a Kubernetes service, another
        team's vLLM, SGLang, llama.cpp): `sage llm engine register`. Options: `label`,
        `role`, `max_inflight`, `cost_per_1k_tokens`, `check` (default True: URL/v1/models
        must list `model`). `stop_engine` only unregisters it."""
        from sagellm_cli.core.engines.external import parse_registration, register

        registration = parse_registration({"url": url, "model": model, "kind": kind, **options})
        return register(self.manager, registration)

    # -- presets -----------------------------------------------------------------

    @staticmethod
    def _load_preset(preset: str | os.PathLike[str]):
        from sagellm_cli.core import presets

        if isinstance(preset, os.PathLike) or str(preset).endswith((".yaml", ".yml")):
            return presets.load(file=os.fspath(preset))
        if not isinstance(preset, str) or not preset:
            raise BadInput(f"preset must be a built-in name or a YAML path, not {preset!r}")
        return presets.load(name=preset)

    def plan(self, preset: str | os.PathLike[str]) -> PresetPlan:
        """What `apply` would do now (`sage llm preset apply --dry-run`); starts nothing.
        `preset` is a built-in name or a path to a YAML file."""
        from sagellm_cli.core.presets import make_plan

        return make_plan(self._load_preset(preset), self.manager)

    def apply(
        self,
        preset: str | os.PathLike[str],
        dry_run: bool = False,
        *,
        confirm_remove: bool = False,
        rollback: bool = True,
        timeout: float = 600.0,
    ) -> ApplyResult | PresetPlan:
        """Bring a preset up, as `sage llm preset apply`: all engines at once, rolled back
        on failure (ApplyFailed, an OperationFailed carrying `.result`). With `dry_run`,
        the plan is returned instead. Engines the file no longer lists are stopped only
        with `confirm_remove` (BadInput otherwise)."""
        from sagellm_cli.core.presets import apply_plan

        plan = self.plan(preset)
        if dry_run:
            return plan
        return apply_plan(plan, self.manager, timeout=_timeout(timeout), rollback=rollback,
                          confirm_remove=confirm_remove)  # fmt: skip

    def down(self, name: str) -> list[EngineRecord]:
        """Stop every engine of an applied preset (idempotent); the stopped records."""
        from sagellm_cli.core import presets

        return presets.down(name, self.manager)

    # -- GPUs --------------------------------------------------------------------

    def gpus(self) -> GpuSnapshot:
        """The NVML inventory with this machine's reservations (`sage llm gpu`). Without
        NVML, `inventory.gpus` is empty and `inventory.reason` says why."""
        from sagellm_cli.core.gpu import gpu_snapshot

        return gpu_snapshot(self.manager.snapshot())

    # -- the gateway -------------------------------------------------------------

    def serve(
        self,
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        routing: str = "round_robin",
        scheduling: str = "none",
        background: bool = True,
        timeout: float = 60.0,
        **options: Any,
    ) -> GatewayHandle:
        """Start a gateway in front of this home's engines and return its handle.

        `background=True`: the background daemon, as `sage llm serve --background`
        (recorded in the state file, outlives this process until stopped).
        `background=False`: the same app in a thread of this process (not recorded, so
        `sage llm serve --stop` never signals your program; it ends with the process).
        `port=0` picks a free port. `options` are `sage llm serve`'s, by their
        GatewayConfig names (max_inflight_per_engine, max_queue, slo_reject, api_key, ...).
        """
        from sagellm_cli.core.credentials import ensure_admin_token
        from sagellm_cli.gateway.config import GatewayConfig

        _timeout(timeout)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise BadInput(f"port must be 0 (any free port) to 65535, not {port!r}")
        try:
            config = GatewayConfig(host=host, port=port, routing=routing,
                                   scheduling=scheduling, **options)  # fmt: skip
        except TypeError as exc:
            raise BadInput(f"unknown gateway option: {exc}",
                           hint="see GatewayConfig's fields (docs/gateway.md)") from None  # fmt: skip
        config.admin_token = config.admin_token or ensure_admin_token()
        if background:
            handle = self._serve_daemon(config, timeout)
        else:
            from sagellm_cli.gateway.embedded import ThreadedGateway

            thread = ThreadedGateway(config).start(timeout=timeout)
            handle = GatewayHandle(thread.url, "thread", config.admin_token, config.api_key,
                                   thread=thread)  # fmt: skip
        self.gateway = handle
        return handle

    @staticmethod
    def _serve_daemon(config: Any, timeout: float) -> GatewayHandle:
        from sagellm_cli.core.launchers.ports import allocate_port
        from sagellm_cli.gateway import daemon

        if config.port == 0:  # the child must know its port before it binds
            config.port = allocate_port(config.host, ())
        config.validate()
        record = daemon.start_background(config, timeout=timeout)
        return GatewayHandle(record.url, "daemon", config.admin_token, config.api_key,
                             pid=record.pid)  # fmt: skip

    def _gateway_url(self) -> str:
        if self.gateway is not None and self.gateway.running:
            return self.gateway.url
        from sagellm_cli.core.engines.monitor import gateway_url

        try:
            return gateway_url(self.manager.store)
        except NotFound as exc:
            raise NotFound(exc.message, hint="call ControlPlane.serve() first, or "
                           "`sage llm serve --background`") from None  # fmt: skip

    def metrics(self, window: float = 60.0) -> GatewayMetrics:
        """The running gateway's aggregates over the last `window` seconds (0 < window
        <= 600): per model, per engine and in total. The gateway is the one `serve`
        started, else the one recorded in the state file."""
        from sagellm_cli.core.credentials import read_admin_token
        from sagellm_cli.core.engines.monitor import fetch_metrics
        from sagellm_cli.gateway.telemetry.stats import GatewayMetrics

        if self.gateway is not None and self.gateway.running:
            return self.gateway.metrics(window)
        doc = fetch_metrics(self._gateway_url(), read_admin_token(), window)
        return GatewayMetrics.from_dict(doc)

    def client(self) -> UnifiedInferenceClient:
        """A shared `UnifiedInferenceClient` for the current gateway (closed by `close()`)."""
        from sagellm_cli.client import UnifiedInferenceClient

        url = self._gateway_url()
        with self._lock:
            if self._client is None or self._client_url != url:
                if self._client is not None:
                    self._client.close()
                ours = self.gateway is not None and self.gateway.url == url
                api_key = self.gateway.api_key if ours else None  # None: $SAGELLM_API_KEY
                self._client = UnifiedInferenceClient(url, api_key=api_key)
                self._client_url = url
            return self._client

    def submit_request(
        self,
        prompt: str | list[dict[str, Any]],
        *,
        model: str | None = None,
        priority: str = "normal",
        slo_deadline_ms: float | None = None,
        request_id: str | None = None,
        **params: Any,
    ) -> RequestHandle:
        """Send one request through the gateway's scheduler and return at once.

        A string is a prompt for `/v1/completions`; a list of messages goes to
        `/v1/chat/completions`. `priority` (critical, high, normal, low) and
        `slo_deadline_ms` become the gateway's headers, so the `--scheduling` policy
        orders it; `params` go into the body (max_tokens, temperature, cost_budget, ...).
        `request_id` names the request (default: a new `req-PID-N`). Returns a handle: `handle.result(timeout)` or `await handle`.
        """
        from sagellm_cli.client import PRIORITIES

        chat_path = protocol.v1_relative(protocol.CHAT)

        if not isinstance(priority, str) or priority.lower() not in PRIORITIES:
            raise BadInput(f"unknown priority {priority!r}", hint=f"use one of {PRIORITIES}")
        if isinstance(prompt, str):
            path, body = protocol.v1_relative(protocol.COMPLETIONS), {"prompt": prompt}
        elif isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            path, body = chat_path, {"messages": prompt}
        else:
            raise BadInput("submit_request takes a prompt string or a list of messages",
                           hint='e.g. [{"role": "user", "content": "hi"}]')  # fmt: skip
        gateway = {"priority": priority.lower(), "slo_deadline_ms": slo_deadline_ms}
        if "cost_budget" in params:
            gateway["cost_budget"] = params.pop("cost_budget")
        body = {**params, **body, **({"model": model} if model else {})}
        client = self.client()
        request_id = request_id or f"req-{os.getpid()}-{next(_request_ids)}"
        chat = path == chat_path

        def run() -> InferenceResult:
            answer = client.post(path, body, **gateway)
            data = answer.body
            choice = data["choices"][0]
            text = (choice["message"]["content"] if chat else choice["text"]) or ""
            return InferenceResult(request_id, text, data.get("model"), answer.engine,
                                   data.get("usage"), answer.latency_s, time.time(),
                                   data)  # fmt: skip

        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="sagellm-req")
            handle = RequestHandle(request_id, self._pool.submit(run), priority, slo_deadline_ms)
            self._requests[request_id] = handle
            while len(self._requests) > _KEPT_REQUESTS:
                self._requests.popitem(last=False)
        return handle

    def request(self, request_id: str) -> RequestHandle:
        """A recent request by id (the last 1024 are kept); NotFound otherwise."""
        handle = self._requests.get(request_id)
        if handle is None:
            raise NotFound(f"no recent request {request_id!r}",
                           hint=f"only the last {_KEPT_REQUESTS} requests are kept")  # fmt: skip
        return handle

    # -- lifetime ----------------------------------------------------------------

    def close(self) -> None:
        """Stop the in-process gateway `serve` started, wait for submitted requests, close
        the client. Processes of their own keep running, as after the CLI: engines and a
        background gateway (stop them with `stop_engine`, `down`, `handle.stop()`)."""
        if self.gateway is not None and self.gateway.mode == "thread":
            self.gateway.stop()
        with self._lock:
            pool, self._pool = self._pool, None
            client, self._client = self._client, None
        if pool is not None:
            pool.shutdown(wait=True)
        if client is not None:
            client.close()
        with _HOME_LOCK:
            _HOME_USERS.discard(self)

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def __getattr__(name: str) -> Any:
    # ControlPlaneManager lives with the other seed names (sagellm_cli/seed/), which build
    # on this module; still importable from here through the package's lazy table, so this
    # module never imports the seeds (no import cycle).
    if name == "ControlPlaneManager":
        import sagellm_cli

        return sagellm_cli.ControlPlaneManager
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ControlPlane",
    "GatewayHandle",
    "InferenceResult",
    "RequestHandle",
    "RequestStatus",
]
