"""What the gateway, its clients and the engines say to each other over HTTP.

One definition each of the header names, priority classes, routes, the OpenAI error
body and URL building; everything else imports them from here (tests/test_single_source.py
fails when one of these literals reappears elsewhere). Stdlib only: the CLI imports it.
"""

from __future__ import annotations

from typing import Any

# -- headers (lower case: ASGI hands them over so; HTTP compares them case-insensitively)
HEADER_PRIORITY = "x-priority"
HEADER_DEADLINE = "x-slo-deadline-ms"
HEADER_COST_BUDGET = "x-cost-budget"
HEADER_SESSION = "x-session-id"
# Which engine answered: set by the gateway on every proxied response.
HEADER_ENGINE = "x-sagellm-engine"
AUTHORIZATION = "authorization"

# -- priority classes, most urgent first
PRIORITY_CLASSES = ("critical", "high", "normal", "low")
DEFAULT_PRIORITY = "normal"

# -- routes. The OpenAI API lives under /v1; /health and /metrics at the root.
V1 = "/v1"
HEALTH = "/health"
METRICS = "/metrics"
MODELS = V1 + "/models"
CHAT = V1 + "/chat/completions"
COMPLETIONS = V1 + "/completions"
MESSAGES = V1 + "/messages"  # Anthropic Messages
RESPONSES = V1 + "/responses"  # OpenAI Responses
EMBEDDINGS = V1 + "/embeddings"
RERANK = V1 + "/rerank"
SCORE = V1 + "/score"
TOKENIZE = "/tokenize"
DETOKENIZE = "/detokenize"
MANAGEMENT = V1 + "/management"
MANAGEMENT_ENGINES = MANAGEMENT + "/engines"
MANAGEMENT_METRICS = MANAGEMENT + "/metrics"
# vLLM's own: sleep mode and runtime LoRA adapters.
ENGINE_SLEEP = "/sleep"
ENGINE_WAKE = "/wake_up"
LORA_LOAD = V1 + "/load_lora_adapter"
LORA_UNLOAD = V1 + "/unload_lora_adapter"

# The type of an OpenAI error body, by HTTP status.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
}


def error_object(
    status: int, message: str, code: str | None = None, *, type_: str | None = None, **extra: Any
) -> dict[str, Any]:
    """`{"error": {"message", "type", "param", "code", ...}}`, the OpenAI error shape."""
    error = {
        "message": message,
        "type": type_ or _ERROR_TYPES.get(status, "error"),
        "param": extra.pop("param", None),
        "code": code,
    }
    error.update(extra)
    return {"error": error}


def bearer(token: str | None) -> dict[str, str]:
    """The Authorization header for `token` (none without one)."""
    return {AUTHORIZATION: f"Bearer {token}"} if token else {}


def priority_class(value: Any) -> str | None:
    """`critical|high|normal|low` (case-insensitive) from a header or body value, else None."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not isinstance(value, str):
        return None
    value = value.strip().lower()
    return value if value in PRIORITY_CLASSES else None


def base_url(host: str, port: int) -> str:
    """`http://host:port` for a server bound to `host`: a wildcard bind (`0.0.0.0`, `::`,
    empty) is reached on loopback, and an IPv6 address is bracketed (`http://[::1]:8000`)."""
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def api_base(url: str) -> str:
    """`http://h:p`, `http://h:p/` or `http://h:p/v1/` -> `http://h:p/v1`."""
    url = url.strip().rstrip("/")
    return url if url.endswith(V1) else url + V1


def v1_relative(route: str) -> str:
    """A /v1 route as a path under a base URL that ends in /v1: `/chat/completions`."""
    return route.removeprefix(V1)


def health_path(external: bool) -> str:
    """What a health check GETs: `/health`, or `/v1/models` for an external server (the one
    route every OpenAI-compatible server has; /health is not universal)."""
    return MODELS if external else HEALTH
