"""`kv` routing as units: the KV-event index, its decoding of vLLM's payloads, the strategy.

Payloads are encoded with the installed vLLM's own msgspec structs (`vllm.distributed.
kv_events`), and with structs of the other layout seen in vLLM's history (a map batch; array
events), declared here because that vLLM is not installed. No process, no network, except
the last test, which reads events from a real ZMQ PUB socket in this process.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

from sagellm_cli.core.launchers.ports import allocate_port
from sagellm_cli.core.launchers.runtimes import KV_EVENTS_TOPIC, kv_events_argv
from sagellm_cli.core.records import EngineRecord
from sagellm_cli.gateway.routing.backend import Backend
from sagellm_cli.gateway.routing.kv_events import (
    EngineIndex,
    KVEventIndex,
    chain_keys,
    decode_batch,
    prompt_tokens,
)
from sagellm_cli.gateway.routing.strategies import (
    ROUTING_ALIASES,
    KVPrefix,
    RouteInfo,
    make_strategy,
)

BS = 4


def _vllm_events():
    return pytest.importorskip("vllm.distributed.kv_events")


# The other layout: the batch as a map, each event an array led by its tag.
class _MapBatch(msgspec.Struct, omit_defaults=True):
    ts: float
    events: list
    data_parallel_rank: int | None = None


class _ArrayEvent(msgspec.Struct, array_like=True, omit_defaults=True, tag=True):
    pass


class BlockStored(_ArrayEvent):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class BlockRemoved(_ArrayEvent):
    block_hashes: list[int]
    medium: str | None


class AllBlocksCleared(_ArrayEvent):
    pass


def _stored_vllm(kv, hashes, parent, tokens):
    return kv.BlockStored(
        block_hashes=hashes, parent_block_hash=parent, token_ids=tokens, block_size=BS,
        lora_id=None, medium="GPU", lora_name=None,
    )  # fmt: skip


def _payload_vllm(kv, *events) -> bytes:
    return msgspec.msgpack.encode(kv.KVEventBatch(ts=time.time(), events=list(events)))


def _payload_other(*events) -> bytes:
    return msgspec.msgpack.encode(_MapBatch(ts=time.time(), events=list(events)))


TOKENS = list(range(100, 112))  # three blocks of four


def test_chain_keys_depend_on_the_whole_prefix():
    a = chain_keys(TOKENS, BS)
    assert len(a) == 3
    assert chain_keys(TOKENS + [1, 2], BS) == a  # a partial block has no key
    b = chain_keys([9, 9, 9, 9] + TOKENS[4:], BS)
    assert b[1] != a[1] and b[2] != a[2]  # same blocks after a different first block
    assert chain_keys(TOKENS[4:], BS, parent=a[0]) == a[1:]


@pytest.mark.parametrize("layout", ["vllm", "other"])
def test_index_follows_stored_removed_cleared(layout):
    if layout == "vllm":
        kv = _vllm_events()

        def stored(h, p, t):
            return _payload_vllm(kv, _stored_vllm(kv, h, p, t))

        def removed(h):
            return _payload_vllm(kv, kv.BlockRemoved(block_hashes=h, medium="GPU"))

        def cleared():
            return _payload_vllm(kv, kv.AllBlocksCleared())
    else:

        def stored(h, p, t):
            return _payload_other(BlockStored(h, p, t, BS, None, "GPU"))

        def removed(h):
            return _payload_other(BlockRemoved(h, "GPU"))

        def cleared():
            return _payload_other(AllBlocksCleared())

    keys = chain_keys(TOKENS, BS)
    index = EngineIndex()
    # The first two blocks in one event, the third in a later one naming its parent.
    index.apply_payload(stored([11, 12], None, TOKENS[:8]))
    index.apply_payload(stored([13], 12, TOKENS[8:]))
    assert index.bad_batches == 0
    assert (index.blocks, index.block_size) == (3, BS)
    assert index.matched(keys) == 3
    assert index.matched(chain_keys([0, 0, 0, 0] + TOKENS[4:], BS)) == 0
    index.apply_payload(removed([12]))
    assert index.matched(keys) == 1  # the prefix breaks at the removed block
    index.apply_payload(stored([21], 99, TOKENS[:4]))  # a parent it never saw
    assert index.unknown_parents == 1 and index.blocks == 2
    index.apply_payload(cleared())
    assert index.blocks == 0 and index.matched(keys) == 0


def test_bad_payloads_are_counted_not_raised():
    index = EngineIndex()
    for payload in (b"\xc1", msgspec.msgpack.encode({"ts": 1}), msgspec.msgpack.encode([1, [5]])):
        index.apply_payload(payload)
    assert index.bad_batches == 3
    with pytest.raises(ValueError):
        decode_batch(b"\xc1")


def _backend(i: int, model: str = "/models/m") -> Backend:
    record = EngineRecord(
        id=f"e{i}", kind="llm", runtime="vllm", model=model, served_model_name="m",
        host="127.0.0.1", port=9000 + i, status="ready", created_at=time.time() + i,
        kv_events_port=9100 + i,
    )  # fmt: skip
    return Backend(record)


class _Index:
    """A KVEventIndex stand-in holding given EngineIndexes (the strategy reads only this)."""

    def __init__(self, engines):
        self.engines = engines
        self.tokenizers = {}
        self.routed_blocks = self.expected_hit_blocks = 0

    def index_for(self, backend):
        return self.engines.get(backend.id)


def _holding(tokens) -> EngineIndex:
    index = EngineIndex()
    index.block_size = BS
    for n, key in enumerate(chain_keys(tokens, BS)):
        index._keys_by_hash[n], index._count[key] = key, 1
    return index


def _info(tokens) -> RouteInfo:
    return RouteInfo({"prompt": tokens}, None)  # token-id prompts need no tokenizer


def test_kv_routes_to_the_longest_cached_prefix():
    a, b, c = _backend(0), _backend(1), _backend(2)
    other = [7] * 12
    index = _Index({"e0": _holding(other), "e1": _holding(TOKENS[:8]), "e2": _holding(TOKENS)})
    kv = KVPrefix(index)
    assert kv.choose([a, b, c], _info(TOKENS + [1])) is c
    assert kv.choose([a, b], _info(TOKENS)) is b  # c not a candidate: b has 2 blocks
    assert kv.choose([a, b, c], _info(other)) is a
    assert (index.routed_blocks, index.expected_hit_blocks) == (9, 3 + 2 + 3)
    # No replica holds it: the same one every time (rendezvous on the first block).
    fresh = [5] * 12
    picks = {kv.choose([a, b, c], _info(fresh)).id for _ in range(5)}
    assert len(picks) == 1


def _pile_up(kv, backends, tokens, n):
    """`n` requests of one prompt that all stay in flight; a replica chosen caches it."""
    picks = []
    for _ in range(n):
        chosen = kv.choose(backends, _info(tokens))
        chosen.inflight += 1
        picks.append(chosen.id)
        kv.index.engines[chosen.id] = _holding(tokens)  # what its events would then say
    return picks


def test_kv_holds_a_prefix_to_the_sticky_bound_then_spreads():
    a, b = _backend(0), _backend(1)
    kv = KVPrefix(_Index({"e0": _holding(TOKENS), "e1": _holding([5] * 12)}))
    picks = _pile_up(kv, [a, b], TOKENS, 16)
    # ceil(1.5 * (k + 1) / 2) lets the holder take 3 before the 4th spills; once both
    # hold the prefix, the less loaded one gets it.
    assert picks[:4] == ["e0"] * 3 + ["e1"]
    assert abs(a.inflight - b.inflight) <= 1


def test_kv_without_stickiness_spills_at_the_prefix_bound():
    a, b = _backend(0), _backend(1)
    kv = KVPrefix(_Index({"e0": _holding(TOKENS), "e1": _holding([5] * 12)}), 256, 1.25, 1.0)
    picks = _pile_up(kv, [a, b], TOKENS, 4)
    assert picks[:3] == ["e0", "e0", "e1"]  # ceil(1.25 * 3 / 2) = 2 in flight at most


def test_kv_falls_back_to_prefix_without_events():
    a, b = _backend(0), _backend(1)
    kv = KVPrefix(_Index({"e0": _holding(TOKENS)}))  # e1 publishes nothing
    body = {"prompt": "same text " * 40}
    picks = {kv.choose([a, b], RouteInfo(body, None)).id for _ in range(4)}
    assert picks == {make_strategy("prefix").choose([a, b], RouteInfo(body, None)).id}
    kv.index.engines["e1"] = EngineIndex()  # subscribed, but nothing stored yet: a
    assert kv.choose([a, b], _info(TOKENS)) is a  # size from e0's events; e1 holds nothing
    kv.index.engines["e1"].block_size = 2 * BS  # two sizes: no common keys, characters
    assert {kv.choose([a, b], RouteInfo(body, None)).id for _ in range(4)} == picks
    assert isinstance(make_strategy("kv"), KVPrefix)
    assert ROUTING_ALIASES["precise_prefix"] == "kv"


def test_prompt_tokens_uses_the_local_tokenizer(tiny_model):
    from sagellm_cli.core.models.tokens import local_tokenizer

    tokenizer = local_tokenizer(str(tiny_model))
    ids = prompt_tokens({"prompt": "hello world"}, tokenizer)
    assert ids == tokenizer.encode("hello world")
    chat = prompt_tokens({"messages": [{"role": "user", "content": "hi"}]}, tokenizer)
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
        )
        assert chat == tokenizer.encode(text, add_special_tokens=False)
    else:
        assert chat is None
    assert prompt_tokens({"prompt": "hello world"}, None) is None  # not local, or loading
    assert prompt_tokens({"prompt": [1, 2, 3]}, None) == [1, 2, 3]


@pytest.mark.parametrize(
    ("on_this_machine", "endpoint"), [(True, "tcp://127.0.0.1:5599"), (False, "tcp://*:5599")]
)
def test_kv_events_argv_is_vllms_config(on_this_machine, endpoint):
    argv = kv_events_argv(5599, on_this_machine)
    config = msgspec.json.decode(argv[argv.index("--kv-events-config") + 1])
    assert config == {
        "enable_kv_cache_events": True, "publisher": "zmq",
        "endpoint": endpoint, "topic": KV_EVENTS_TOPIC,
    }  # fmt: skip
    kv_config = pytest.importorskip("vllm.config.kv_events")
    kv_config.KVEventsConfig(**config)  # the installed vLLM accepts every field
    # A local engine's publisher connects (to the gateway on loopback); a node's binds.
    publisher = pytest.importorskip("vllm.distributed.kv_events").ZmqEventPublisher
    assert publisher._is_bind_endpoint(endpoint) is (not on_this_machine)


@pytest.mark.parametrize("node", ["local", "ray:10.0.0.2"])
def test_subscriber_reads_a_real_publisher(node):
    """A local engine's publisher connects to the gateway's socket bound on loopback; an
    engine on another node binds its own, which the gateway connects to."""
    zmq = pytest.importorskip("zmq")
    kv = _vllm_events()

    async def scenario():
        context = zmq.Context.instance()
        pub = context.socket(zmq.PUB)
        backend = _backend(0)
        backend.record.node = node
        events = KVEventIndex()
        try:
            if node == "local":
                port = allocate_port("127.0.0.1", set())
                backend.record.kv_events_port = port
                events.sync([backend])
                pub.connect(f"tcp://127.0.0.1:{port}")
            else:
                port = pub.bind_to_random_port("tcp://127.0.0.1")
                backend.record.kv_events_port = port
                events.sync([backend])
            index = events.index_for(backend)
            assert index is not None
            payload = _payload_vllm(kv, _stored_vllm(kv, [1, 2, 3], None, TOKENS))
            for seq in range(200):  # until the subscription has reached the publisher
                pub.send_multipart([KV_EVENTS_TOPIC.encode(), seq.to_bytes(8, "big"), payload])
                await asyncio.sleep(0.02)
                if index.blocks:
                    break
            assert index.matched(chain_keys(TOKENS, BS)) == 3
            events.sync([])  # the engine is gone: its subscriber and index too
            assert events.index_for(backend) is None
        finally:
            await events.close()
            pub.close(linger=0)

    asyncio.run(scenario())


def test_prepare_tokenizes_off_the_loop_for_choose(tiny_model):
    from sagellm_cli.core.models.tokens import local_tokenizer

    model = str(tiny_model)
    tokenizer = local_tokenizer(model)
    prompt = "shared words " * 100
    tokens = tokenizer.encode(prompt)
    a, b = _backend(0, model), _backend(1, model)
    index = _Index({"e0": EngineIndex(), "e1": _holding(tokens)})  # e0: nothing stored yet
    index.tokenizers[model] = tokenizer
    kv = KVPrefix(index)
    info = RouteInfo({"prompt": prompt}, None)
    asyncio.run(kv.prepare([a, b], info))
    assert info.kv_keys == (BS, chain_keys(tokens, BS))
    assert kv.choose([a, b], info) is b
