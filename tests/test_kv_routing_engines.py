"""`kv` routing with real engines: two tiny vLLM replicas started with `--kv-events` behind
`sage llm serve --routing kv` (all real processes; no fakes).

The gateway must learn each engine's cached blocks from its KV events and route a prompt
to the engine that holds its prefix, even when that prefix was cached by a request sent to
the engine directly (so no hash of the prompt could have known it); a hot prefix must still
spread once its engine is over the load bound.
"""

from __future__ import annotations

import concurrent.futures
import re

import httpx
import pytest
from conftest import needs_vllm, start_engines_at_once, stop_all_engines, wait_for
from test_gateway_support import running_gateway

pytestmark = [pytest.mark.engines, needs_vllm]

WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
]


def _prefix(seed: int) -> str:
    """About 300 tokens of text, different for each seed."""
    words = [WORDS[(seed * 7 + i * (seed + 3)) % len(WORDS)] + str(seed) for i in range(150)]
    return " ".join(words)


@pytest.fixture(scope="module")
def kv_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("kvroute") / "sagellm"
    home.mkdir(parents=True)
    yield home
    stop_all_engines(home)


@pytest.fixture(scope="module")
def engines(kv_home, tiny_model):
    args = ["--served-model-name", "tiny", "--kv-events", "--max-model-len", "1024",
            "--kv-cache-gb", "0.0625", "--timeout", "400"]  # fmt: skip
    return list(start_engines_at_once(kv_home, tiny_model, {"k1": args, "k2": args}).values())


@pytest.fixture(scope="module")
def gateway(kv_home, engines):
    with running_gateway(kv_home, "--routing", "kv", "--health-interval", "1") as gw:
        wait_for(lambda: httpx.get(gw.url + "/ready").status_code == 200, 30, "gateway ready")
        wait_for(lambda: len(_blocks(gw)) == 2, 30, "a KV subscriber per engine")
        # Until its tokenizer has loaded (transformers' import, in a thread) kv routes as prefix.
        loaded = re.compile(r"sagellm_gateway_kv_tokenizer_loaded\{[^}]*\} 1")
        wait_for(lambda: loaded.search(httpx.get(gw.url + "/metrics").text), 180, "the tokenizer")
        yield gw


def _blocks(gw) -> dict[str, float]:
    """sagellm_gateway_kv_cached_blocks per engine id, from the gateway's /metrics."""
    text = httpx.get(gw.url + "/metrics").text
    found = re.finditer(r'sagellm_gateway_kv_cached_blocks\{engine="([^"]+)"[^}]*\} (\S+)', text)
    return {m.group(1): float(m.group(2)) for m in found}


def _complete(url: str, prompt: str, max_tokens: int = 2, model: str = "tiny") -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r


def test_engine_records_and_argv_carry_the_publisher(engines):
    for record in engines:
        port = record["kv_events_port"]
        assert port and port != record["port"]
        # On this machine the engine connects to the gateway on loopback: nothing listens
        # on another address for its prompts' token ids.
        assert f"tcp://127.0.0.1:{port}" in " ".join(record["command"])


def test_prompts_follow_the_engine_that_cached_their_prefix(gateway, engines):
    # Each prefix is cached on a chosen engine by a request sent to it directly; the
    # gateway can only know where it is from that engine's KV events.
    for n in range(6):
        engine = engines[n % 2]
        prefix = _prefix(100 + n)
        before = _blocks(gateway)[engine["id"]]
        _complete(engine["url"], prefix, model=engine["served_model_name"])
        wait_for(lambda e=engine, b=before: _blocks(gateway)[e["id"]] > b, 20, "the stored blocks")
        r = _complete(gateway.url, prefix + f" and then question {n}?")
        assert r.headers["x-sagellm-engine"] == engine["id"], f"prefix {n}"


def test_a_hot_prefix_spreads_over_both_engines(gateway, engines):
    prefix = _prefix(7)
    first = _complete(gateway.url, prefix).headers["x-sagellm-engine"]
    wait_for(lambda: _blocks(gateway)[first] > 0, 20, "the stored blocks")
    # 16 at once: the holder may take ceil(1.5 * (k + 1) / 2) in flight, 3 of the first 4.
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [
            pool.submit(_complete, gateway.url, prefix + f" variant {i}", 96) for i in range(16)
        ]
        served = [f.result().headers["x-sagellm-engine"] for f in futures]
    assert set(served) == {e["id"] for e in engines}, served
