"""Blocking readiness probes over HTTP, stdlib only (cheap to import in the CLI)."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from urllib.parse import urlsplit

from sagellm_cli.core import protocol


def get(
    url: str, path: str, timeout: float, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """`GET url+path` over plain HTTP: (status, body). Raises OSError or HTTPException."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path.rstrip("/") + path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def health_ok(url: str, timeout: float = 1.0) -> bool:
    """True if `GET /health` answers 200."""
    try:
        return get(url, protocol.HEALTH, timeout)[0] == 200
    except (OSError, http.client.HTTPException):
        return False


# One tiny request per engine kind: what "it answers" means, for readiness and for the
# gateway's probes of running engines. A broken engine can pass /health and die here.
PROBE_REQUESTS: dict[str, tuple[str, dict]] = {
    "llm": (protocol.COMPLETIONS, {"prompt": "ping", "max_tokens": 1}),
    "embedding": (protocol.EMBEDDINGS, {"input": ["ping"]}),
}


def probe_request(kind: str, model: str) -> tuple[str, bytes]:
    """The path and JSON body of the one-token generation (one-input embedding) probe."""
    path, body = PROBE_REQUESTS[kind]
    return path, json.dumps({"model": model, **body}).encode()


def post(url: str, path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
    """`POST url+path` with a JSON body over plain HTTP: (status, body)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("POST", parts.path.rstrip("/") + path, body,
                     {"Content-Type": "application/json"})  # fmt: skip
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@dataclass(frozen=True)
class ReadyCheck:
    """One readiness look: `ready`, or not yet, or `failure` when the engine answered its
    first request with an error (it is up but cannot serve)."""

    ready: bool
    failure: str | None = None


NOT_YET = ReadyCheck(False)


def check_ready(
    url: str, kind: str, served_model_name: str, timeout: float = 2.0, *, generate: bool = True
) -> ReadyCheck:
    """Ready once `/health` answers 200, `/v1/models` lists the model (llm engines) and
    one real request (a 1-token completion, a 1-input embedding) succeeds; `generate=False`
    skips that request (re-checking an engine already seen answering)."""
    try:
        status, _ = get(url, protocol.HEALTH, timeout)
        if status != 200:
            return NOT_YET
        if kind == "llm":
            status, body = get(url, protocol.MODELS, timeout)
            if status != 200:
                return NOT_YET
            models = json.loads(body).get("data", [])
            if not any(m.get("id") == served_model_name for m in models):
                return NOT_YET
        if not generate:
            return ReadyCheck(True)
        path, payload = probe_request(kind, served_model_name)
        status, body = post(url, path, payload, timeout)
    except (OSError, http.client.HTTPException, ValueError, AttributeError):
        return NOT_YET  # not listening yet, or it went away (the caller sees the exit)
    if status == 200:
        return ReadyCheck(True)
    if status == 503:
        return NOT_YET  # still loading behind its API server
    text = body.decode("utf-8", errors="replace").strip().replace("\n", " ")[:300]
    return ReadyCheck(False, f"its first {path} request answered {status}: {text}")


def post_json(url: str, path: str, body: dict, timeout: float) -> tuple[int, bytes]:
    """`post()` with a dict body encoded as JSON."""
    return post(url, path, json.dumps(body).encode(), timeout)
