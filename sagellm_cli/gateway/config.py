"""Gateway options, shared by the CLI, the app factory and the benchmark."""

from __future__ import annotations

from dataclasses import dataclass, field

from sagellm_cli.core.errors import BadInput

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8889


@dataclass
class GatewayConfig:
    """Everything the gateway needs to know at start-up."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    routing: str = "round_robin"
    # Per-model strategy overrides: served name (or label / model id) -> strategy.
    model_routing: dict[str, str] = field(default_factory=dict)
    api_key: str | None = None
    admin_token: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    # Connection limits (gateway/transport.py). Past max_connections a new connection evicts
    # those waiting longest on a slow or idle client (503 only when none is); lowered at
    # start to what the open-file limit allows.
    max_connections: int = 2048
    # Request line + headers larger than this -> 431 and the connection is closed.
    max_header_bytes: int = 64 * 1024
    # A connection must send a complete request head within this many seconds of being
    # opened (or of its previous response), else it is closed: silent and slowloris clients.
    header_timeout_s: float = 10.0
    # A request body must have arrived in full this many seconds after its head, else the
    # connection is closed: slow-POST trickles (0 = no limit).
    body_timeout_s: float = 60.0
    # Idle keep-alive connections are closed after this many seconds (uvicorn's keep-alive).
    keep_alive_timeout_s: float = 5.0
    # Active health checks and passive failure counting.
    health_interval_s: float = 2.0
    health_timeout_s: float = 1.0
    failure_threshold: int = 3
    # How often the state file's mtime is polled.
    state_poll_s: float = 0.5
    connect_timeout_s: float = 3.0
    # `prefix` routing: how many characters of the prompt form the key, and the load bound.
    prefix_chars: int = 256
    prefix_load_factor: float = 1.25
    # `length` routing: prompts longer than this many characters go to `role: prefill`.
    length_threshold_chars: int = 2048
    # "aiohttp" (default), "httpx", or the experimental "native" (native.py): see
    # docs/benchmarks.md, "The native upstream client", for why it is not the default.
    upstream_client: str = "aiohttp"
    # Admission control and queueing (scheduling.py): "none" installs no scheduler at all.
    scheduling: str = "none"
    max_queue: int = 1000  # per model; beyond it 429 + Retry-After (0 = unbounded)
    queue_timeout_s: float = 0.0  # 0 = wait as long as it takes
    max_inflight_per_engine: int = 16  # unless the engine's spec sets max_inflight; 0 = no limit
    slo_reject: bool = False
    # Defence in depth against DNS rebinding and CSRF (auth.RequestGuard): Host names
    # accepted besides loopback and the bind address ("*": any), and Origins accepted
    # besides the gateway's own.
    allowed_hosts: list[str] = field(default_factory=list)
    allowed_origins: list[str] = field(default_factory=list)
    # Let management API requests set any engine env, bind engines off loopback and
    # pass code-loading flags (--trust-remote-code ...). Off: the API can't run code.
    allow_remote_engine_config: bool = False

    def validate(self) -> None:
        """Reject unsafe or impossible settings before anything binds (exit 2)."""
        from sagellm_cli.gateway.routing import STRATEGIES

        for name in [self.routing, *self.model_routing.values()]:
            if name not in STRATEGIES:
                raise BadInput(
                    f"unknown routing strategy {name!r}",
                    hint=f"use one of {', '.join(sorted(STRATEGIES))}",
                )
        if not 1 <= self.port <= 65535:
            raise BadInput(f"port {self.port} is out of range", hint="use 1-65535")
        if self.failure_threshold < 1:
            raise BadInput("--failure-threshold must be at least 1")
        if self.upstream_client not in ("native", "aiohttp", "httpx"):
            raise BadInput("upstream client must be native, aiohttp or httpx")
        from sagellm_cli.gateway.policies import POLICIES

        if self.scheduling not in ("none", *POLICIES):
            raise BadInput(
                f"unknown scheduling policy {self.scheduling!r}",
                hint=f"use none or one of {', '.join(POLICIES)}",
            )
        if self.max_queue < 0 or self.queue_timeout_s < 0 or self.max_inflight_per_engine < 0:
            raise BadInput(
                "--max-queue, --queue-timeout and --max-inflight-per-engine must be >= 0",
                hint="0 means no limit",
            )

    @property
    def url(self) -> str:
        """The base URL clients use (no `/v1`)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        if host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"
