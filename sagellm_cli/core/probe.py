"""Blocking readiness probes over HTTP, stdlib only (cheap to import in the CLI)."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit


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
        return get(url, "/health", timeout)[0] == 200
    except (OSError, http.client.HTTPException):
        return False


def is_ready(url: str, kind: str, served_model_name: str, timeout: float = 2.0) -> bool:
    """True once `/health` answers 200 and, for llm engines, `/v1/models` lists the model."""
    try:
        status, _ = get(url, "/health", timeout)
        if status != 200:
            return False
        if kind != "llm":
            return True
        status, body = get(url, "/v1/models", timeout)
        if status != 200:
            return False
        models = json.loads(body).get("data", [])
        return any(m.get("id") == served_model_name for m in models)
    except (OSError, http.client.HTTPException, ValueError, AttributeError):
        return False


def post_json(url: str, path: str, body: dict, timeout: float) -> tuple[int, bytes]:
    """`POST url+path` with a JSON body over plain HTTP: (status, body). Raises OSError or
    HTTPException."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"}
        conn.request("POST", parts.path.rstrip("/") + path, json.dumps(body), headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()
