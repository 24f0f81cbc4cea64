"""Gateway options, shared by the CLI, the app factory and the benchmark."""

from __future__ import annotations

import ipaddress
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
        if not is_loopback(self.host) and not self.admin_token:
            raise BadInput(
                f"refusing to bind {self.host} without an admin token: the management API "
                "could start processes for anyone on the network",
                hint="pass --admin-token or set SAGELLM_ADMIN_TOKEN (and --api-key for inference)",
            )
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


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
