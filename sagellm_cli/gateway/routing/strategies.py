"""Routing strategies: pick one healthy replica for a request.

Every strategy sees the healthy replicas of one model (a list the registry keeps
up to date) and the request's `RouteInfo`. They are O(replicas), allocate
nothing on the common path, and keep their own small state (a counter).
"""

from __future__ import annotations

import asyncio
import math
import random
from typing import Any, Protocol

from sagellm_cli.gateway.routing.backend import Backend, stable_hash

_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: spreads the bits of `key ^ replica` for rendezvous hashing."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK
    return x ^ (x >> 31)


class RouteInfo:
    """What strategies may look at: computed lazily, at most once per request."""

    __slots__ = ("body", "session", "_text", "kv_keys")

    def __init__(self, body: dict[str, Any] | None, session: str | None):
        self.body = body
        self.session = session
        self._text: str | None = None
        # `kv` routing's block keys of the prompt: (block size, keys), or None.
        self.kv_keys: tuple[int, list[int] | None] | None = None

    def prompt_text(self, limit: int = 1 << 30) -> str:
        """The prompt (completions) or the concatenated message contents (chat, messages,
        responses), up to `limit`."""
        if self._text is None:
            self._text = _prompt_text(self.body or {}, limit)
        return self._text

    def prefix(self, n: int) -> str:
        """The first `n` characters of the prompt."""
        return self.prompt_text()[:n]


class InvalidPrompt(ValueError):
    """The request's `messages` or `prompt` can't be read (the proxy answers 400)."""


def _prompt_text(body: dict[str, Any], limit: int) -> str:
    prompt = body.get("prompt")
    if prompt is not None:
        if isinstance(prompt, list):
            prompt = prompt[0] if prompt else ""
        return prompt[:limit] if isinstance(prompt, str) else str(prompt)[:limit]
    messages = body.get("messages")
    if messages is None:
        # The Responses API's `input`: a string, or message items (embeddings' `input`, a
        # list of strings, has no prompt to route by).
        items = body.get("input")
        if isinstance(items, str):
            return items[:limit]
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            return ""
        messages = items
    if not isinstance(messages, list):
        raise InvalidPrompt("'messages' must be a list of message objects")
    parts: list[str] = []
    size = 0
    for message in messages:
        if not isinstance(message, dict):
            raise InvalidPrompt("each entry of 'messages' must be an object")
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict):
                    raise InvalidPrompt("each content part must be an object")
                text = part.get("text")
                if text is not None and not isinstance(text, str):
                    raise InvalidPrompt("a content part's 'text' must be a string")
                texts.append(text or "")
            content = "".join(texts)
        elif content is not None and not isinstance(content, str):
            raise InvalidPrompt("a message's 'content' must be a string or a list of parts")
        if content:
            parts.append(content)
            size += len(content)
            if size >= limit:
                break
    return "".join(parts)[:limit]


class Strategy(Protocol):
    """Pick one of `backends` (non-empty, all healthy) for a request."""

    name: str
    # True if `choose` reads the prompt (the proxy validates it first, answering 400).
    uses_prompt: bool
    # True if `eligible` may differ between requests (the scheduler then lets a waiter
    # whose engines have room pass one whose engines are full).
    eligible_varies: bool
    # True for `pd`: the proxy runs the prefill step on `prefill_backend` first.
    disaggregated: bool

    def eligible(self, backends: list[Backend], info: RouteInfo) -> list[Backend]:
        """The replicas of `backends` the request may wait for (the scheduler's admission)."""
        ...

    def choose(self, backends: list[Backend], info: RouteInfo) -> Backend: ...


class BaseStrategy:
    """What most strategies share: every replica is eligible for every request."""

    eligible_varies = False
    disaggregated = False

    def eligible(self, backends: list[Backend], info: RouteInfo) -> list[Backend]:
        """All of `backends` (the same list, not a copy)."""
        return backends


class RoundRobin(BaseStrategy):
    """Each replica in turn."""

    name = "round_robin"
    uses_prompt = False

    def __init__(self) -> None:
        self._next = 0

    def choose(self, backends: list[Backend], info: RouteInfo) -> Backend:
        self._next += 1
        return backends[self._next % len(backends)]


class LeastLoaded(BaseStrategy):
    """Fewest requests in flight; ties are broken in turn so idle replicas share work."""

    name = "least_loaded"
    uses_prompt = False

    def __init__(self) -> None:
        self._next = 0

    def choose(self, backends: list[Backend], info: RouteInfo) -> Backend:
        n = len(backends)
        if n == 1:
            return backends[0]
        self._next += 1
        start = self._next % n
        best = backends[start]
        for i in range(1, n):
            candidate = backends[(start + i) % n]
            if candidate.inflight < best.inflight:
                best = candidate
        return best


class Random(BaseStrategy):
    """A uniformly random replica."""

    name = "random"
    uses_prompt = False

    def choose(self, backends: list[Backend], info: RouteInfo) -> Backend:
        return backends[random.randrange(len(backends))] if len(backends) > 1 else backends[0]


class PowerOfTwo(BaseStrategy):
    """Two random replicas; the less loaded one wins."""

    name = "power_of_two"
    uses_prompt = False

    def choose(self, backends: list[Backend], info: RouteInfo) -> Backend:
        n = len(backends)
        if n == 1:
            return backends[0]
        i = random.randrange(n)
        j = random.randrange(n - 1)
        if j >= i:
            j += 1
        a, b = backends[i], backends[j]
        return b if b.inflight < a.inflight else a


def _rendezvous(backends: list[Backend], key_hash: int) -> Backend:
    """Highest-random-weight hashing: removing a replica moves only its own keys."""
    best = backends[0]
    best_score = -1
    for backend in backends:
        score = _mix(key_hash ^ backend.hash_id)
        if score > best_score:
            best, best_score = backend, score
    return best


class Affinity(BaseStrategy):
    """The same `user` / `X-Session-Id` always lands on the same replica (while it is healthy)."""

    name = "affinity"
    uses_prompt = False

    def __init__(self) -> None:
        self._fallback = LeastLoaded()

    def choose(self, backends: list[Backend], info: RouteInfo) -> Backend:
        if len(backends) == 1:
            return backends[0]
        if not info.session:
            return self._fallback.choose(backends, info)
        return _rendezvous(backends, stable_hash(info.session))


class Prefix(BaseStrategy):
    """Shared prompt prefixes go to the same replica (its prefix cache), within a load bound.

    Consistent hashing with bounded loads: replicas are tried in rendezvous order
    and the first one whose in-flight count stays under
    `ceil(load_factor * (total + 1) / n)` wins, so one hot prefix can't swamp a replica.
    """

    name = "prefix"
    uses_prompt = True

    def __init__(self, chars: int = 256, load_factor: float = 1.25) -> None:
        self.chars = chars
        self.load_factor = load_factor
        self._fallback = LeastLoaded()

    def choose(self, backends: list[Backend], info: RouteInfo) -> Backend:
        n = len(backends)
        if n == 1:
            return backends[0]
        key = info.prefix(self.chars)
        if not key:
            return self._fallback.choose(backends, info)
        key_hash = stable_hash(key)
        total = sum(b.inflight for b in backends)
        bound = math.ceil(self.load_factor * (total + 1) / n)
        ranked = sorted(backends, key=lambda b: _mix(key_hash ^ b.hash_id), reverse=True)
        for backend in ranked:
            if backend.inflight + 1 <= bound:
                return backend
        return ranked[0]


class Length(BaseStrategy):
    """Long prompts to `role: prefill` replicas, short ones to `role: decode`.

    This is seed 001/002's PD separation, honestly named: it routes whole
    requests by prompt length; it does not split prefill from decode. A role
    with no replica falls back to every replica. Within a role: least loaded.
    The threshold is in characters, or, with `threshold_tokens` > 0, in tokens
    (`core.models.tokens.count_tokens`: the model's tokenizer when its directory is local,
    else characters / 4).
    """

    name = "length"
    uses_prompt = True
    eligible_varies = True

    def __init__(self, threshold_chars: int = 2048, threshold_tokens: int = 0) -> None:
        self.threshold = threshold_chars
        self.threshold_tokens = threshold_tokens
        self._inner = LeastLoaded()

    def is_long(self, backends: list[Backend], info: RouteInfo) -> bool:
        """True when the prompt is over the threshold (so it belongs to `prefill`)."""
        if self.threshold_tokens <= 0:
            return len(info.prompt_text(self.threshold + 1)) > self.threshold
        from sagellm_cli.core.models.tokens import count_tokens

        text = info.prompt_text()
        # A token is at least one UTF-8 byte: a prompt of few bytes needs no tokenizer.
        if len(text) <= self.threshold_tokens and len(text.encode()) <= self.threshold_tokens:
            return False
        model = backends[0].record.model if backends else None  # one model per group
        return count_tokens(text, model) > self.threshold_tokens

    def _pool(self, backends: list[Backend], info: RouteInfo) -> list[Backend]:
        role = "prefill" if self.is_long(backends, info) else "decode"
        return [b for b in backends if b.role == role] or backends

    def eligible(self, backends: list[Backend], info: RouteInfo) -> list[Backend]:
        """The replicas of the prompt's role, so that a request waits for its own role
        rather than spilling onto the other; all of them if that role has none."""
        return self._pool(backends, info) if len(backends) > 1 else backends

    def choose(self, backends: list[Backend], info: RouteInfo) -> Backend:
        return self._inner.choose(self._pool(backends, info), info)


class KVPrefix(BaseStrategy):
    """The replica holding the longest cached prefix of the prompt, within load bounds.

    The cached blocks come from the engines' own KV events (gateway/routing/kv_events.py); the
    prompt is tokenized with the model's tokenizer and cut into the engines' blocks.

    - Among the replicas under `prefix`'s bound, `ceil(load_factor * (total + 1) / n)` in
      flight, the one with the most leading blocks cached wins. Equal hits: for a prefix
      no replica holds yet, rendezvous order of its first block (concurrent requests of a
      new prefix meet before its events arrive); for one several hold, the least loaded
      (so a hot prefix, once copied, spreads).
    - The best holder may go on up to the higher `sticky_load_factor` bound when it holds
      more than half the prompt's blocks beyond that winner: a longer queue there costs
      less than prefilling (and caching twice) the prefix elsewhere. Past it the prefix
      spills, and the replica it spills to caches it too.

    Without events or a local tokenizer for every replica, it is `prefix` (characters).
    """

    name = "kv"
    uses_prompt = True

    def __init__(
        self,
        index: Any = None,
        chars: int = 256,
        load_factor: float = 1.25,
        sticky_load_factor: float = 1.5,
    ) -> None:
        self.index = index  # a gateway.kv_events.KVEventIndex, shared by the gateway's groups
        self.load_factor = load_factor
        self.sticky_load_factor = max(sticky_load_factor, load_factor)
        self._fallback = Prefix(chars, load_factor)

    def _keys(self, backends: list[Backend], info: RouteInfo, block_size: int) -> list[int] | None:
        cached = info.kv_keys
        if cached is not None and cached[0] == block_size:
            return cached[1]
        from sagellm_cli.gateway.routing.kv_events import chain_keys, prompt_tokens

        tokenizer = self.index.tokenizers.get(backends[0].record.model)  # loaded by its loop
        tokens = prompt_tokens(info.body or {}, tokenizer)
        keys = chain_keys(tokens, block_size) if tokens else None
        info.kv_keys = (block_size, keys)
        return keys

    async def prepare(self, backends: list[Backend], info: RouteInfo) -> None:
        """Tokenize the prompt in a worker thread before `choose` (which then finds the keys
        in `info`): a tokenizer takes milliseconds the event loop must not spend."""
        if len(backends) < 2 or self.index is None or info.kv_keys is not None:
            return
        size = _block_size([self.index.index_for(b) for b in backends])
        if size and self.index.tokenizers.get(backends[0].record.model):
            await asyncio.to_thread(self._keys, backends, info, size)

    def choose(self, backends: list[Backend], info: RouteInfo) -> Backend:
        n = len(backends)
        if n == 1:
            return backends[0]
        indexes = [self.index.index_for(b) for b in backends] if self.index else [None]
        size = _block_size(indexes)
        if not size:  # an engine without events, none stored yet, or blocks of two sizes
            return self._fallback.choose(backends, info)
        keys = self._keys(backends, info, size)
        if not keys:
            return self._fallback.choose(backends, info)
        total = sum(b.inflight for b in backends)
        bound = math.ceil(self.load_factor * (total + 1) / n)
        sticky = math.ceil(self.sticky_load_factor * (total + 1) / n)
        first = keys[0]
        best, best_key = None, None  # under `bound`: (hit, tie-break)
        holder, holder_hit = None, -1  # under `sticky`: the longest hit
        for backend, index in zip(backends, indexes, strict=True):
            if backend.inflight + 1 > sticky:
                continue
            hit = index.matched(keys)
            if hit > holder_hit:
                holder, holder_hit = backend, hit
            if backend.inflight + 1 > bound:
                continue
            tie = _mix(first ^ backend.hash_id) if hit == 0 else -backend.inflight
            if best_key is None or (hit, tie) > best_key:
                best, best_key = backend, (hit, tie)
        if holder is not None and (best_key is None or holder_hit > best_key[0] + len(keys) / 2):
            best, best_key = holder, (holder_hit, 0)
        if best is None:  # the least loaded is always under the bound; just in case
            best, best_key = max(backends, key=lambda b: _mix(first ^ b.hash_id)), (0, 0)
        self.index.routed_blocks += len(keys)
        self.index.expected_hit_blocks += best_key[0]
        return best


def _block_size(indexes: list[Any]) -> int | None:
    """The engines' one block size (learned from their events); None if an engine has no
    index, none has stored a block yet, or two sizes differ."""
    if any(index is None for index in indexes):
        return None
    sizes = {index.block_size for index in indexes if index.block_size}
    return sizes.pop() if len(sizes) == 1 else None


def has_connector(backend: Backend) -> bool:
    """True if the engine was started with a vLLM KV connector (`kv_connector`)."""
    spec = backend.record.spec
    return spec is not None and spec.kv_connector is not None


def is_disaggregated(backends: list[Backend]) -> bool:
    """True for a group with a prefill and a decode engine that both have a KV connector:
    the registry gives it `pd` routing whatever `--routing` says (docs/routing.md)."""
    roles = {b.role for b in backends if has_connector(b)}
    return "prefill" in roles and "decode" in roles


class Disaggregated(BaseStrategy):
    """Prefill/decode disaggregation: the proxy sends the prompt to a `prefill` engine
    (max_tokens 1, `kv_transfer_params` asking it to keep the KV for a remote decode),
    then the request with the returned `kv_transfer_params` to a `decode` engine, which
    loads the KV through the connector instead of computing it (gateway/http/pd.py).

    `choose` and `eligible` are about the decode side (the scheduler's slot, the retry);
    `prefill_backend` picks the prefill side. Within each: least loaded.
    """

    name = "pd"
    uses_prompt = False
    disaggregated = True

    def __init__(self) -> None:
        self._decode = LeastLoaded()
        self._prefill = LeastLoaded()

    def eligible(self, backends: list[Backend], info: RouteInfo) -> list[Backend]:
        """The decode engines (all engines, if the group has none left)."""
        return [b for b in backends if b.role != "prefill"] or backends

    def choose(self, backends: list[Backend], info: RouteInfo) -> Backend:
        return self._decode.choose(self.eligible(backends, info), info)

    def prefill_backend(self, backends: list[Backend]) -> Backend | None:
        """A healthy prefill engine with a connector; None if there is none."""
        pool = [b for b in backends if b.role == "prefill" and b.healthy and has_connector(b)]
        return self._prefill.choose(pool, None) if pool else None  # type: ignore[arg-type]


STRATEGIES = {
    cls.name: cls
    for cls in (RoundRobin, LeastLoaded, Random, PowerOfTwo, Affinity, Prefix, Length,
                KVPrefix, Disaggregated)
}  # fmt: skip
# The seeds' names (docs/gateway.md has the table), accepted wherever a strategy is named.
# `topology_aware` is least_loaded: topology (NVLink, NUMA) is applied when an engine's GPUs
# are placed (core/gpu/placement.py); between running replicas there is none left to weigh.
ROUTING_ALIASES = {
    "load_balanced": "least_loaded",
    "locality": "prefix",
    "precise_prefix": "kv",
    "topology_aware": "least_loaded",
}


def make_strategy(
    name: str,
    *,
    prefix_chars: int = 256,
    prefix_load_factor: float = 1.25,
    length_threshold_chars: int = 2048,
    length_threshold_tokens: int = 0,
    kv_index: Any = None,
    kv_sticky_load_factor: float = 1.5,
) -> Strategy:
    """A fresh strategy instance (each model keeps its own counters); `kv` reads `kv_index`."""
    if name == "kv":
        return KVPrefix(kv_index, prefix_chars, prefix_load_factor, kv_sticky_load_factor)
    if name == "prefix":
        return Prefix(prefix_chars, prefix_load_factor)
    if name == "length":
        return Length(length_threshold_chars, length_threshold_tokens)
    return STRATEGIES[name]()
