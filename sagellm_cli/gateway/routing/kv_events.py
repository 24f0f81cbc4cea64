"""vLLM's KV-cache events, kept per engine as a set of cached prompt blocks (`kv` routing).

Engines started with `kv_events` (core/launchers/runtimes.py: `--kv-events-config`, a ZMQ PUB socket)
publish `[topic, seq, payload]` messages whose payload is a msgpack `EventBatch` of
`BlockStored`, `BlockRemoved` and `AllBlocksCleared` events. Their layout differs between
vLLM versions (the batch and the events as arrays or as maps), so payloads are decoded to
plain lists and dicts and read by field name or, for arrays, by position (the positions of
the fields read here are the same in every layout seen: docs/routing.md).

vLLM's own block hashes depend on a seed that may be random per process, so they are not
reproduced. `BlockStored` carries the blocks' token ids: the index gives each block a key
of its own, chained from its parent's key and its tokens (`chain_keys`), and maps vLLM's hash
to it only to apply `BlockRemoved`. A request's prompt, tokenized with the model's tokenizer,
is cut into blocks and chained the same way; the cached prefix on an engine is the number of
leading keys it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from sagellm_cli.core.launchers.base import launcher_for
from sagellm_cli.core.launchers.runtimes import KV_EVENTS_TOPIC, kv_events_endpoint

if TYPE_CHECKING:
    from sagellm_cli.gateway.routing.backend import Backend

log = logging.getLogger("sagellm.gateway")

# The key chain starts from this value (any constant: keys only meet keys of this process).
ROOT_KEY = 0
# Prompts longer than this (characters) are cut before tokenizing: the routing needs a prefix.
MAX_PROMPT_CHARS = 64 * 1024
_MASK = (1 << 64) - 1


def chain_keys(tokens: Sequence[int], block_size: int, parent: int = ROOT_KEY) -> list[int]:
    """The key of each full block of `tokens`, each chained from the one before (`parent`
    for the first), so equal keys mean equal prefixes, not just equal blocks."""
    keys = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash((parent, tuple(tokens[start : start + block_size]))) & _MASK
        keys.append(parent)
    return keys


def _field(event: Any, name: str, position: int) -> Any:
    """A field of an event decoded as a map (by name) or as an array (by position)."""
    if isinstance(event, dict):
        return event.get(name)
    return event[position] if position < len(event) else None


def decode_batch(payload: bytes) -> list[tuple[str, Any]]:
    """The events of one msgpack EventBatch as `(type name, raw event)` pairs.

    Raises ValueError for a payload no known layout explains."""
    import msgspec

    try:
        batch = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not msgpack: {exc}") from None
    events = batch.get("events") if isinstance(batch, dict) else None
    if isinstance(batch, list) and len(batch) >= 2:
        events = batch[1]  # [ts, events, data_parallel_rank]
    if not isinstance(events, list):
        raise ValueError("no event list in the batch")
    out = []
    for event in events:
        if isinstance(event, dict) and isinstance(event.get("type"), str):
            out.append((event["type"], event))
        elif isinstance(event, list) and event and isinstance(event[0], str):
            out.append((event[0], event))
        else:
            raise ValueError("an event without a type tag")
    return out


class EngineIndex:
    """The cached blocks of one engine, as learned from its events."""

    def __init__(self) -> None:
        # Learned from the first BlockStored (16 on GPUs, 128 on vLLM's CPU build).
        self.block_size: int | None = None
        # vLLM's block hash -> our key, and our key -> how many vLLM blocks carry it.
        self._keys_by_hash: dict[Any, int] = {}
        self._count: dict[int, int] = {}
        self.events = 0
        self.unknown_parents = 0
        self.bad_batches = 0

    @property
    def blocks(self) -> int:
        """Blocks cached now (as far as the events said)."""
        return len(self._keys_by_hash)

    def apply(self, kind: str, event: Any) -> None:
        """Apply one decoded event (see `decode_batch`)."""
        self.events += 1
        if kind == "BlockStored":
            self._stored(event)
        elif kind == "BlockRemoved":
            for block_hash in _field(event, "block_hashes", 1) or ():
                self._remove(_hashable(block_hash))
        elif kind == "AllBlocksCleared":
            self.clear()

    def apply_payload(self, payload: bytes) -> None:
        """Apply every event of one message's payload; a bad one is counted and skipped."""
        try:
            events = decode_batch(payload)
            for kind, event in events:
                self.apply(kind, event)
        except (ValueError, TypeError, IndexError, KeyError):
            self.bad_batches += 1

    def clear(self) -> None:
        """Forget every block (the engine dropped its cache, or restarted)."""
        self._keys_by_hash.clear()
        self._count.clear()

    def _stored(self, event: Any) -> None:
        hashes = _field(event, "block_hashes", 1) or []
        parent_hash = _field(event, "parent_block_hash", 2)
        tokens = _field(event, "token_ids", 3) or []
        block_size = _field(event, "block_size", 4)
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError("BlockStored without a block size")
        self.block_size = block_size
        if parent_hash is None:
            parent = ROOT_KEY
        else:
            parent = self._keys_by_hash.get(_hashable(parent_hash))
            if parent is None:  # its parent was stored before we subscribed
                self.unknown_parents += 1
                return
        keys = chain_keys(tokens, block_size, parent)
        for block_hash, key in zip(hashes, keys, strict=False):
            block_hash = _hashable(block_hash)
            if block_hash in self._keys_by_hash:
                continue
            self._keys_by_hash[block_hash] = key
            self._count[key] = self._count.get(key, 0) + 1

    def _remove(self, block_hash: Any) -> None:
        key = self._keys_by_hash.pop(block_hash, None)
        if key is None:
            return
        left = self._count.get(key, 0) - 1
        if left > 0:
            self._count[key] = left
        else:
            self._count.pop(key, None)

    def matched(self, keys: Sequence[int]) -> int:
        """How many of `keys`, from the first, this engine holds (its cached prefix, in
        blocks)."""
        count = self._count
        n = 0
        for key in keys:
            if key not in count:
                break
            n += 1
        return n


def _hashable(block_hash: Any) -> Any:
    """vLLM's hashes are ints or bytes (a list if an old layout encoded a tuple)."""
    return tuple(block_hash) if isinstance(block_hash, list) else block_hash


def subscriber_url(host: str, port: int) -> str:
    """Where to connect to an engine's publisher (a wildcard bind is reached on loopback)."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


class KVEventIndex:
    """Every engine's index, fed by one subscriber task per engine that publishes events.

    `run` keeps the subscribers in step with the registry (engines come, go and restart);
    an engine without a publisher (external, not started with `kv_events`) has no index and
    `kv` routing falls back to `prefix` for its model.
    """

    def __init__(self) -> None:
        self.engines: dict[str, EngineIndex] = {}
        self._tasks: dict[str, tuple[tuple[str | None, str], asyncio.Task]] = {}
        self.available = True
        self.unavailable_reason: str | None = None
        # Model -> its local tokenizer (None: not local), loaded in a thread by `run`:
        # importing transformers takes seconds, which the event loop must never wait.
        self.tokenizers: dict[str, Any] = {}
        # What `kv` routing predicted: prompt blocks routed, and of those cached on the chosen
        # engine (their ratio is the hit rate the index expects; compare vLLM's own).
        self.routed_blocks = 0
        self.expected_hit_blocks = 0

    def index_for(self, backend: Backend) -> EngineIndex | None:
        """The index of an engine, or None when it publishes no events (or we can't read them)."""
        return self.engines.get(backend.id)

    def sync(self, backends: Iterable[Backend]) -> None:
        """Start a subscriber for each new publishing engine and stop those of engines that
        are gone or run as a new process (whose cache starts empty)."""
        wanted: dict[str, tuple[tuple[str | None, str, bool], Backend]] = {}
        for backend in backends:
            record = backend.record
            if record.kv_events_port and not record.is_external:
                # The engine's publisher connects to us on loopback when it runs on this
                # machine, else it binds on its node (core/launchers/runtimes.py): the
                # same launcher property decided its argv.
                local = launcher_for(record.node).on_this_machine
                url = (
                    kv_events_endpoint(record.kv_events_port, on_this_machine=True)
                    if local
                    else subscriber_url(record.host, record.kv_events_port)
                )
                wanted[backend.id] = ((record.instance, url, local), backend)
        for engine_id, (ident, task) in list(self._tasks.items()):
            if engine_id not in wanted or wanted[engine_id][0] != ident:
                task.cancel()
                del self._tasks[engine_id]
                self.engines.pop(engine_id, None)
        if not wanted or not self._zmq_ok():
            return
        for engine_id, (ident, _backend) in wanted.items():
            if engine_id not in self._tasks:
                index = EngineIndex()
                self.engines[engine_id] = index
                subscribe = self._subscribe(ident[1], index, bind=ident[2])
                task = asyncio.create_task(subscribe, name="kv-events")
                task.add_done_callback(_log_end)
                self._tasks[engine_id] = (ident, task)

    def _zmq_ok(self) -> bool:
        if not self.available:
            return False
        try:
            import msgspec  # noqa: F401
            import zmq.asyncio  # noqa: F401
        except ImportError as exc:
            self.available = False
            self.unavailable_reason = f"pyzmq/msgspec missing ({exc.name})"
            log.warning("kv routing: %s; routing by prompt characters", self.unavailable_reason)
            return False
        return True

    async def _subscribe(self, url: str, index: EngineIndex, bind: bool = False) -> None:
        """Receive one engine's event batches into `index`: bound on `url` (the engine's
        publisher connects to it) or connected to the engine's bound publisher."""
        import zmq
        import zmq.asyncio

        context = zmq.asyncio.Context.instance()
        sock = context.socket(zmq.SUB)
        try:
            if url.startswith("tcp://["):
                sock.setsockopt(zmq.IPV6, 1)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SUBSCRIBE, KV_EVENTS_TOPIC.encode())
            if bind:
                sock.bind(url)
            else:
                sock.connect(url)
            log.info("kv routing: subscribed on %s", url)
            last_seq: int | None = None
            while True:
                frames = await sock.recv_multipart()
                if len(frames) != 3:
                    index.bad_batches += 1
                    continue
                seq = int.from_bytes(frames[1], "big", signed=True)
                if last_seq is not None and seq != last_seq + 1:
                    # Events were lost (the engine restarted, or its queue overflowed):
                    # what we knew may be wrong, so start over.
                    index.clear()
                last_seq = seq
                index.apply_payload(frames[2])
        finally:
            sock.close(linger=0)

    async def run(self, backends: Callable[[], Iterable[Backend]], interval: float = 1.0) -> None:
        """Keep the subscribers in step with the registry's `backends()` until cancelled."""
        from sagellm_cli.core.models.tokens import local_tokenizer
        from sagellm_cli.gateway.loops import every

        async def step() -> None:
            current = list(backends())
            self.sync(current)
            for model in {b.record.model for b in current if b.id in self.engines}:
                if model not in self.tokenizers:
                    self.tokenizers[model] = await asyncio.to_thread(local_tokenizer, model)

        try:
            await every(interval, step, "kv routing: could not follow the engines' events")
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop every subscriber."""
        tasks = [task for _, task in self._tasks.values()]
        self._tasks.clear()
        self.engines.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _log_end(task: asyncio.Task) -> None:
    """A subscriber that failed (a bad address, say) says why; its engine keeps an empty
    index, so `kv` routing sees no hits there until the engine restarts."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("kv routing: a KV-event subscriber stopped: %s", task.exception())


def prompt_tokens(body: dict[str, Any], tokenizer: Any) -> list[int] | None:
    """The prompt's token ids as vLLM will see them, or None when there is no tokenizer
    (the model is not local, or it is still loading) or no prompt it can tokenize.

    Completions: the prompt with the tokenizer's special tokens (vLLM's default); token-id
    prompts as given. Chat: the chat template with the generation prompt."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch: route by its first prompt
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return prompt
    if tokenizer is None:
        return None
    try:
        if isinstance(prompt, str):
            return tokenizer.encode(prompt[:MAX_PROMPT_CHARS])
        messages = body.get("messages")
        if isinstance(messages, list) and getattr(tokenizer, "chat_template", None):
            # As vLLM does: the template's text, encoded without adding special tokens again.
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            return tokenizer.encode(text[:MAX_PROMPT_CHARS], add_special_tokens=False)
    except Exception:  # noqa: BLE001 - a prompt the tokenizer refuses routes by characters
        return None
    return None
