"""The inference endpoints the gateway proxies: one table, read by the app's dispatcher, the
proxy, the registry and the metrics.

Every endpoint finds its model the same way, by the body's `model` (the only model of its
kind when omitted), and goes through the same auth, admission and metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

from sagellm_cli.core import protocol
from sagellm_cli.core.records import EXTERNAL, VLLM


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One proxied endpoint: its metrics label, its path (the same upstream), the kind of
    engine that serves it, whether `stream: true` is honoured, and which runtimes serve
    it (None: every runtime of that kind)."""

    name: str
    path: str
    kind: str
    streams: bool
    runtimes: frozenset[str] | None = None

    def served_by(self, runtime: str) -> bool:
        """True if an engine of `runtime` (of this endpoint's kind) serves this path."""
        return self.runtimes is None or runtime in self.runtimes


# vLLM's pooling runner scores and reranks; our sentence-transformers server only embeds.
# What an external server serves is unknown, so it is given the benefit of the doubt.
_POOLING = frozenset({VLLM, EXTERNAL})

ENDPOINTS = (
    Endpoint("chat", protocol.CHAT, "llm", True),
    Endpoint("completions", protocol.COMPLETIONS, "llm", True),
    Endpoint("messages", protocol.MESSAGES, "llm", True),  # Anthropic Messages
    Endpoint("responses", protocol.RESPONSES, "llm", True),  # OpenAI Responses
    Endpoint("tokenize", protocol.TOKENIZE, "llm", False),
    Endpoint("detokenize", protocol.DETOKENIZE, "llm", False),
    Endpoint("embeddings", protocol.EMBEDDINGS, "embedding", False),
    Endpoint("rerank", protocol.RERANK, "embedding", False, _POOLING),
    Endpoint("score", protocol.SCORE, "embedding", False, _POOLING),
)
BY_PATH = {e.path: e for e in ENDPOINTS}
# Where to send a model of each engine kind (for the 400 that redirects a client).
PATH_FOR_KIND = {"llm": protocol.CHAT, "embedding": protocol.EMBEDDINGS}
