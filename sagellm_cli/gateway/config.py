"""Gateway options, shared by the CLI, the app factory and the benchmark."""

from __future__ import annotations

from dataclasses import dataclass, fields

from sagellm_cli.core.engines.scheduler import POLICIES as EVICTION_POLICIES
from sagellm_cli.core.errors import BadInput
from sagellm_cli.core.inputs.options import CliOption, as_list, option
from sagellm_cli.gateway.admission.policies import POLICIES, POLICY_ALIASES
from sagellm_cli.gateway.routing.strategies import ROUTING_ALIASES, STRATEGIES

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8889
MIB = 1024 * 1024


# Each field's `sage llm serve` option (core/inputs/options.py; cli/serve.py builds them).
_option = option


def _pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    """Repeated `--model-routing MODEL=STRATEGY` options as a dict."""
    routing: dict[str, str] = {}
    for pair in values or []:
        model, sep, strategy = pair.rpartition("=")
        if not sep or not model or not strategy:
            raise BadInput(
                f"{flag} {pair!r} is not MODEL=STRATEGY", hint=f"e.g. {flag} tiny=affinity"
            )
        routing[model] = strategy
    return routing


def _mib_to_bytes(mib: float, flag: str) -> int:
    return int(mib * MIB)


_LIST = {"cli_type": list[str] | None, "cli_default": None, "to_field": as_list}


@dataclass
class GatewayConfig:
    """Everything the gateway needs to know at start-up: the one definition of its options.

    `sage llm serve`'s options are built from these fields (see `cli_options`); the
    background gateway gets them as JSON.
    """

    host: str = _option(DEFAULT_HOST, "--host", "Address to bind (loopback by default).")
    port: int = _option(DEFAULT_PORT, "--port", "Port to listen on.")
    routing: str = _option(
        "round_robin",
        "--routing",
        "round_robin, least_loaded (load_balanced, topology_aware), random, power_of_two, "
        "affinity, prefix (locality), kv (precise_prefix: engines' KV events, docs/routing.md), "
        "length or pd (prefill/decode engines with a KV connector get pd whatever this says).",
    )
    # Per-model strategy overrides: served name (or label / model id) -> strategy.
    model_routing: dict[str, str] = _option(
        None, "--model-routing", "MODEL=STRATEGY: a strategy for one model (repeatable).",
        factory=dict, cli_type=list[str] | None, cli_default=None, to_field=_pairs,
    )  # fmt: skip
    api_key: str | None = _option(
        None, "--api-key", "Require `Authorization: Bearer KEY` on inference endpoints.",
        envvar="SAGELLM_API_KEY",
    )  # fmt: skip
    admin_token: str | None = _option(
        None, "--admin-token",
        "Token for /v1/management (default: the one in $SAGELLM_HOME/admin-token, created at "
        "first start).",
        envvar="SAGELLM_ADMIN_TOKEN",
    )  # fmt: skip
    max_body_bytes: int = _option(
        8 * MIB, "--max-body-mb", "Largest request body accepted, in MiB (every route).",
        cli_type=float, cli_default=8.0, to_field=_mib_to_bytes,
    )  # fmt: skip
    # Connection limits (gateway/http/transport.py). Past max_connections a new connection evicts
    # those waiting longest on a slow or idle client (503 only when none is); lowered at
    # start to what the open-file limit allows.
    max_connections: int = _option(
        2048, "--max-connections",
        "Most client connections at once; past it the longest-waiting idle or slow clients are "
        "closed (503 only when every connection is busy in the gateway). Lowered to what the "
        "open-file limit allows.",
    )  # fmt: skip
    max_header_bytes: int = _option(
        64 * 1024, "--max-header-kb", "Largest request line + headers, in KiB; larger gets 431.",
        cli_type=int, cli_default=64, to_field=lambda kib, flag: int(kib) * 1024,
    )  # fmt: skip
    header_timeout_s: float = _option(
        10.0, "--header-timeout",
        "Seconds a connection has to send a complete request head, after connecting or after "
        "its previous response (slowloris).",
    )  # fmt: skip
    body_timeout_s: float = _option(
        60.0, "--body-timeout",
        "Seconds a request body may take to arrive in full after its head (0 = no limit).",
    )  # fmt: skip
    keep_alive_timeout_s: float = _option(
        5.0, "--keep-alive-timeout", "Seconds an idle keep-alive connection stays open."
    )
    health_interval_s: float = _option(
        2.0, "--health-interval", "Seconds between active health checks."
    )
    health_timeout_s: float = _option(
        1.0, "--health-timeout", "Seconds an engine's /health may take to answer."
    )
    failure_threshold: int = _option(
        3, "--failure-threshold", "Consecutive failures before an engine leaves rotation."
    )
    state_poll_s: float = _option(
        0.5, "--state-poll", "Seconds between checks of the state file for new engines.",
        hidden=True,
    )  # fmt: skip
    connect_timeout_s: float = _option(
        3.0, "--connect-timeout", "Seconds to connect to an engine before trying another."
    )
    prefix_chars: int = _option(
        256, "--prefix-chars", "`prefix` routing: prompt characters that form the hash key."
    )
    prefix_load_factor: float = _option(
        1.25, "--prefix-load-factor",
        "`prefix` routing: how far above the mean load a replica may go before the key moves.",
    )  # fmt: skip
    kv_sticky_load_factor: float = _option(
        1.5, "--kv-sticky-load-factor",
        "`kv` routing: how far above the mean load the replica caching a prompt's prefix may "
        "go before the prefix spills (at most --prefix-load-factor: spill at that bound).",
    )  # fmt: skip
    length_threshold_chars: int = _option(
        2048, "--length-threshold", "`length` routing: prompts longer than this (chars) go to "
        "prefill.",
    )  # fmt: skip
    length_threshold_tokens: int = _option(
        0, "--length-threshold-tokens",
        "`length` routing: when > 0, the threshold in prompt tokens instead of characters (the "
        "model's tokenizer if its directory is local, else characters / 4).",
    )  # fmt: skip
    # Admission control and queueing (scheduling.py): "none" installs no scheduler at all.
    scheduling: str = _option(
        "none", "--scheduling",
        "Admission control: none, fifo, priority, slo_aware, cost (cost_optimized) or adaptive "
        "(docs/scheduling.md).",
    )  # fmt: skip
    max_queue: int = _option(
        1000, "--max-queue", "Requests that may wait per model; beyond it 429 (0 = unbounded)."
    )
    queue_timeout_s: float = _option(
        0.0, "--queue-timeout", "Seconds a request may wait in the queue before 503 (0 = no limit)."
    )
    max_inflight_per_engine: int = _option(
        16, "--max-inflight-per-engine",
        "In-flight limit per engine unless its spec sets max_inflight (0 = no limit).",
    )  # fmt: skip
    slo_reject: bool = _option(
        False, "--slo-reject/--no-slo-reject",
        "Reject (429) requests whose X-SLO-Deadline-Ms can no longer be met.",
    )  # fmt: skip
    # The supervisor (gateway/control/supervisor.py, docs/supervisor.md).
    wake_timeout_s: float = _option(
        600.0, "--wake-timeout",
        "Seconds a request waits for an unloaded or sleeping engine to load; then 503.",
    )  # fmt: skip
    eviction: str = _option(
        "cost", "--eviction",
        "Which engine makes room for another: cost (reload cost x recent demand per GiB; "
        "never one with queued requests, pinned or leased) or lru (least recently used).",
    )  # fmt: skip
    probe_interval_s: float = _option(
        30.0, "--probe-interval",
        "Seconds an engine must be idle between one-token generation probes that find engines "
        "that answer /health but hang (0 = no probes).",
    )  # fmt: skip
    probe_timeout_s: float = _option(
        30.0, "--probe-timeout", "Seconds a generation probe may take before it counts as failed."
    )
    supervise_interval_s: float = _option(
        1.0, "--supervise-interval",
        "Seconds between supervisor rounds (restarts due, idle unloads, reaping).",
        hidden=True,
    )  # fmt: skip
    # Defence in depth against DNS rebinding and CSRF (auth.RequestGuard).
    allowed_hosts: list[str] = _option(
        None, "--allowed-host",
        "Accept requests with this Host besides loopback and the bind address (repeatable; "
        "* for any). Guards against DNS rebinding.",
        factory=list, **_LIST,
    )  # fmt: skip
    allowed_origins: list[str] = _option(
        None, "--allowed-origin",
        "Accept browser requests from this Origin, e.g. http://localhost:3000 (repeatable). "
        "Other cross-site requests get 403.",
        factory=list, **_LIST,
    )  # fmt: skip
    # Off: the management API can't ask for code execution (docs/security.md).
    allow_remote_engine_config: bool = _option(
        False, "--allow-remote-engine-config",
        "Let management API requests set any engine env, bind engines off loopback and pass "
        "code-loading flags. Off by default: docs/security.md.",
    )  # fmt: skip

    def __post_init__(self) -> None:
        # The seeds' policy names stand for ours from the start (status shows ours).
        self.routing = ROUTING_ALIASES.get(self.routing, self.routing)
        self.model_routing = {m: ROUTING_ALIASES.get(r, r) for m, r in self.model_routing.items()}
        self.scheduling = POLICY_ALIASES.get(self.scheduling, self.scheduling)

    def validate(self) -> None:
        """Reject unsafe or impossible settings before anything binds (exit 2)."""
        for name in [self.routing, *self.model_routing.values()]:
            if name not in STRATEGIES:
                raise BadInput(
                    f"unknown routing strategy {name!r}",
                    hint=f"use one of {', '.join(sorted(STRATEGIES))}",
                )
        if not 1 <= self.port <= 65535:
            raise BadInput(f"port {self.port} is out of range", hint="use 1-65535")
        for value, flag, env, empty_means in (
            (self.api_key, "--api-key", "SAGELLM_API_KEY", "for no key on inference"),
            (self.admin_token, "--admin-token", "SAGELLM_ADMIN_TOKEN", "for the token file"),
        ):
            if value is not None and not value.strip():
                # An empty key would look set and protect nothing (or lock everyone out).
                raise BadInput(
                    f"{flag} (or ${env}) is empty",
                    hint=f"give a key, or leave both unset {empty_means}",
                )
        if self.failure_threshold < 1:
            raise BadInput("--failure-threshold must be at least 1")
        if self.length_threshold_tokens < 0:
            raise BadInput("--length-threshold-tokens must be 0 (use characters) or more")
        if self.scheduling not in ("none", *POLICIES):
            raise BadInput(
                f"unknown scheduling policy {self.scheduling!r}",
                hint=f"use none or one of {', '.join(POLICIES)}",
            )
        if self.max_connections < 1:
            raise BadInput("--max-connections must be at least 1")
        if self.max_header_bytes < 1024:
            raise BadInput("--max-header-kb must be at least 1")
        if self.header_timeout_s <= 0 or self.keep_alive_timeout_s <= 0:
            raise BadInput("--header-timeout and --keep-alive-timeout must be > 0")
        if self.body_timeout_s < 0:
            raise BadInput("--body-timeout must be >= 0", hint="0 means no limit")
        if self.wake_timeout_s <= 0 or self.probe_timeout_s <= 0 or self.supervise_interval_s <= 0:
            raise BadInput("--wake-timeout, --probe-timeout and --supervise-interval must be > 0")
        if self.eviction not in EVICTION_POLICIES:
            raise BadInput(
                f"unknown eviction policy {self.eviction!r}",
                hint=f"use one of {', '.join(EVICTION_POLICIES)}",
            )
        if self.probe_interval_s < 0:
            raise BadInput("--probe-interval must be >= 0", hint="0 turns probes off")
        if self.max_queue < 0 or self.queue_timeout_s < 0 or self.max_inflight_per_engine < 0:
            raise BadInput(
                "--max-queue, --queue-timeout and --max-inflight-per-engine must be >= 0",
                hint="0 means no limit",
            )

    @property
    def url(self) -> str:
        """The base URL clients use (no `/v1`)."""
        from sagellm_cli.core.protocol import base_url

        return base_url(self.host, self.port)


def cli_options() -> dict[str, CliOption]:
    """Each GatewayConfig field's `sage llm serve` option."""
    return {f.name: f.metadata["cli"] for f in fields(GatewayConfig)}
