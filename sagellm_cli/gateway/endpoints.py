"""The inference endpoints the gateway proxies: one table, read by the router, the proxy,
the registry and the metrics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One OpenAI endpoint: its metrics label, its path (the same upstream) and the kind of
    engine that serves it."""

    name: str
    path: str
    kind: str

    @property
    def streams(self) -> bool:
        """True if `stream: true` is honoured (generation, not embeddings)."""
        return self.kind == "llm"


ENDPOINTS = (
    Endpoint("chat", "/v1/chat/completions", "llm"),
    Endpoint("completions", "/v1/completions", "llm"),
    Endpoint("embeddings", "/v1/embeddings", "embedding"),
)
BY_PATH = {e.path: e for e in ENDPOINTS}
# Where to send a model of each engine kind (for the 400 that redirects a client).
PATH_FOR_KIND = {"llm": "/v1/chat/completions", "embedding": "/v1/embeddings"}
