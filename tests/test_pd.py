"""P/D disaggregation: the engine flags, the gateway's prefill -> KV transfer -> decode
path, and (where vLLM and NIXL are installed) a real KV transfer between two CPU engines.

The in-process tests put tests/fakes.py in front of the gateway as the prefill and decode
engines: a fake that isolates our own code (the kv_transfer_params handshake, errors); the
last test runs two real vLLM engines with NixlConnector on CPU buffers.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import httpx
import pytest
from conftest import needs_vllm, sage, stop_all_engines
from fakes import FakeUpstream
from test_gateway_support import add_engine_record, free_port, inprocess_gateway, running_gateway

from sagellm_cli.core.gpu import Placement
from sagellm_cli.core.launchers.runtimes import build_launch
from sagellm_cli.core.records import EngineSpec
from sagellm_cli.gateway.http.pd import PREFILL_PARAMS, prefill_body

CHAT_PATH = "/v1/chat/completions"
CHAT = {"model": "fake", "messages": [{"role": "user", "content": "a long prompt"}]}
KV = {"do_remote_prefill": True, "remote_engine_id": "eng-p", "remote_block_ids": [[1, 2]],
      "remote_host": "127.0.0.1", "remote_port": 5600}  # fmt: skip


def _nixl_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("nixl") is not None


needs_nixl = pytest.mark.skipif(
    not _nixl_available(), reason="nixl absent (pip install --no-deps nixl nixl-cu13)"
)


# -- the engine side ---------------------------------------------------------------


def _launch(spec, tmp_path, placement=None, nixl_port=None):
    return build_launch(spec, runtime="vllm", port=18000, served_model_name="org/m",
                        placement=placement, scratch_dir=tmp_path, cache_dir=None,
                        nixl_port=nixl_port)  # fmt: skip


def _kv_config(argv) -> dict:
    return json.loads(argv[argv.index("--kv-transfer-config") + 1])


def test_nixl_engines_get_the_transfer_config_and_a_side_channel(tmp_path):
    spec = EngineSpec(model="org/m", role="prefill", kv_connector="NixlConnector")
    cpu = _launch(spec, tmp_path, nixl_port=5601)
    assert _kv_config(cpu.argv) == {
        "kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"
    }  # fmt: skip
    assert cpu.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "5601"
    gpu = Placement(gpus=[0], uuids=["GPU-a"], gib_per_gpu=8.0, total_gib=[80.0])
    on_gpu = _launch(spec, tmp_path, placement=gpu, nixl_port=5602)
    assert _kv_config(on_gpu.argv)["kv_buffer_device"] == "cuda"
    # Without a connector: no flag at all.
    assert "--kv-transfer-config" not in _launch(EngineSpec(model="org/m"), tmp_path).argv


def test_bad_connector_is_refused_in_one_line(home):
    proc = sage("llm", "engine", "start", "org/m", "--kv-connector", "Nope", "--no-wait",
                home=home, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "'Nope'" in proc.stderr and "NixlConnector" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = sage("llm", "engine", "start", "m", "--engine-kind", "embedding",
                "--kv-connector", "NixlConnector", "--no-wait", home=home, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "--kv-connector needs an llm engine" in proc.stderr


def test_the_pd_preset_plans_both_engines_on_cpu_with_their_own_side_channels(home, monkeypatch):
    """No GPU: the built-in's `use_gpu: true` falls back to the CPU, KV in host memory."""
    from conftest import invoke

    monkeypatch.setenv("SAGELLM_DISABLE_NVML", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    result = invoke("llm", "preset", "apply", "-n", "qwen-pd-one-gpu", "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    engines = {e["label"]: e for e in json.loads(result.stdout)["engines"]}
    assert set(engines) == {"pd-prefill", "pd-decode"}
    ports = set()
    for engine in engines.values():
        assert engine["gpus"] == [] and engine["blocker"] is None
        assert _kv_config(engine["command"])["kv_buffer_device"] == "cpu"
        ports.add(engine["env"]["VLLM_NIXL_SIDE_CHANNEL_PORT"])
    assert len(ports) == 2 and not ports & {str(e["port"]) for e in engines.values()}


def test_prefill_body_asks_for_one_token_and_a_remote_decode():
    body = {**CHAT, "max_completion_tokens": 64, "stream": True, "min_tokens": 4,
            "stream_options": {"include_usage": True}, "temperature": 0}  # fmt: skip
    out = prefill_body(body, "served")
    assert out["max_tokens"] == 1 and out["stream"] is False and out["model"] == "served"
    assert out["kv_transfer_params"] == PREFILL_PARAMS
    assert "max_completion_tokens" not in out and "min_tokens" not in out
    assert "stream_options" not in out and out["temperature"] == 0
    assert body["stream"] is True  # the client's request is left as it was


# -- the gateway's request path, against fakes (isolating our code) -----------------------


def _pd_records(home, prefill_port, decode_port, connector="NixlConnector"):
    for engine_id, port, role in (("pfill001", prefill_port, "prefill"),
                                  ("decod001", decode_port, "decode")):  # fmt: skip
        spec = EngineSpec(model="/fake/fake", served_model_name="fake", role=role,
                          kv_connector=connector)  # fmt: skip
        add_engine_record(home, engine_id, port, os.getpid(), role=role, spec=spec)


def test_gateway_runs_prefill_then_decode_with_the_kv_params(local_home):
    async def main():
        with FakeUpstream(kv_params=KV) as pre, FakeUpstream() as dec:
            _pd_records(local_home, pre.port, dec.port)
            async with inprocess_gateway(local_home / "state.json") as (gateway, gw):
                assert gateway.registry.groups["llm"]["fake"].strategy.name == "pd"
                # A client's own kv_transfer_params (where to pull KV from) never pass.
                evil = {"do_remote_prefill": True, "remote_host": "10.9.9.9", "remote_port": 1}
                r = await gw.post(CHAT_PATH, json={**CHAT, "max_tokens": 5,
                                                   "kv_transfer_params": evil})  # fmt: skip
                assert r.status_code == 200, r.text
                assert r.headers["x-sagellm-engine"] == "decod001"
                assert r.json()["object"] == "chat.completion"
                assert r.json()["usage"]["completion_tokens"] == 5  # the decode engine's
                [p] = pre.bodies
                assert p["max_tokens"] == 1 and p["stream"] is False
                assert p["kv_transfer_params"] == PREFILL_PARAMS
                [d] = dec.bodies
                assert d["kv_transfer_params"] == KV and d["max_tokens"] == 5
                # Streaming: the prefill is still unary, the decode streams to the client.
                body = {**CHAT, "max_tokens": 3, "stream": True,
                        "stream_options": {"include_usage": True}}  # fmt: skip
                r = await gw.post(CHAT_PATH, json=body)
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/event-stream")
                events = [e for e in r.text.split("\n\n") if e.startswith("data: {")]
                assert events and json.loads(events[-1][6:])["usage"]["completion_tokens"] == 3
                assert pre.bodies[-1]["stream"] is False and "stream_options" not in pre.bodies[-1]
                assert dec.bodies[-1]["stream"] is True
                assert dec.bodies[-1]["kv_transfer_params"] == KV

    asyncio.run(main())


def test_prefill_failure_is_a_502_naming_the_prefill_engine(local_home):
    async def main():
        with FakeUpstream(status=500) as pre, FakeUpstream() as dec:
            _pd_records(local_home, pre.port, dec.port)
            async with inprocess_gateway(local_home / "state.json") as (_, gw):
                r = await gw.post(CHAT_PATH, json=CHAT)
                assert r.status_code == 502
                error = r.json()["error"]
                assert "pfill001" in error["message"] and error["code"] == "prefill_failed"
                assert dec.bodies == []  # no decode without its KV
                # A 4xx from the prefill engine is the client's: passed through as is.
                pre.status = 400
                r = await gw.post(CHAT_PATH, json=CHAT)
                assert r.status_code == 400 and "injected failure" in r.text
                assert dec.bodies == []

    asyncio.run(main())


def test_prefill_engine_unreachable_is_a_502_not_a_hang(local_home):
    async def main():
        with FakeUpstream() as dec:
            _pd_records(local_home, free_port(), dec.port)  # nothing listens there
            async with inprocess_gateway(local_home / "state.json") as (_, gw):
                t0 = time.monotonic()
                r = await gw.post(CHAT_PATH, json=CHAT)
                assert r.status_code == 502 and "pfill001" in r.json()["error"]["message"]
                assert time.monotonic() - t0 < 20

    asyncio.run(main())


def test_without_a_connector_roles_stay_length_routing(local_home):
    async def main():
        with FakeUpstream() as pre, FakeUpstream() as dec:
            _pd_records(local_home, pre.port, dec.port, connector=None)
            async with inprocess_gateway(local_home / "state.json", routing="length") as (g, gw):
                assert g.registry.groups["llm"]["fake"].strategy.name == "length"
                body = {**CHAT, "kv_transfer_params": {"do_remote_prefill": True}}
                r = await gw.post(CHAT_PATH, json=body)  # short: the decode engine, whole
                assert r.status_code == 200 and r.headers["x-sagellm-engine"] == "decod001"
                assert pre.bodies == [] and "kv_transfer_params" not in dec.bodies[0]

    asyncio.run(main())


# -- a real KV transfer: two CPU vLLM engines with NixlConnector ------------------------


def _metric(text: str, name: str, label: str = "") -> float:
    """The sum of the samples of `name` whose labels contain `label`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in "{ " and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _start(home, model, label, role):
    env = {**os.environ, "SAGELLM_HOME": str(home)}
    return subprocess.Popen(
        [sys.executable, "-m", "sagellm_cli", "llm", "engine", "start", str(model),
         "--served-model-name", "tiny", "--label", label, "--role", role,
         "--kv-connector", "NixlConnector", "--max-model-len", "512", "--kv-cache-gb", "0.0625",
         "--timeout", "400", "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.mark.engines
@needs_vllm
@needs_nixl
def test_real_kv_transfer_between_cpu_engines(tmp_path, tiny_model):
    home = tmp_path / "sagellm"
    home.mkdir()
    try:
        procs = {label: _start(home, tiny_model, label, label) for label in ("prefill", "decode")}
        records = {}
        for label, proc in procs.items():
            out, err = proc.communicate(timeout=500)
            assert proc.returncode == 0, f"{label} engine failed to start:\n{err}"
            records[label] = json.loads(out)
        assert records["prefill"]["nixl_port"] != records["decode"]["nixl_port"]
        with running_gateway(home) as gw:
            prompt = "the cat sat on the mat " * 8
            chat = {"model": "tiny", "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": 6, "temperature": 0}  # fmt: skip
            r = httpx.post(gw.url + CHAT_PATH, json=chat, timeout=120)
            assert r.status_code == 200, r.text
            assert r.headers["x-sagellm-engine"] == records["decode"]["id"]
            answer = r.json()
            assert answer["object"] == "chat.completion" and answer["usage"]["completion_tokens"]
            # The same greedy answer as the prefill engine gives on its own: correct text.
            direct = httpx.post(records["prefill"]["url"] + "/v1" + CHAT_PATH[3:], json=chat,
                                timeout=120).json()  # fmt: skip
            text = answer["choices"][0]["message"]["content"]
            assert text and text == direct["choices"][0]["message"]["content"]
            # Streaming through the same path.
            with httpx.stream("POST", gw.url + CHAT_PATH, json={**chat, "stream": True},
                              timeout=120) as s:  # fmt: skip
                assert s.status_code == 200
                streamed = "".join(
                    (json.loads(line[6:])["choices"] or [{}])[0].get("delta", {}).get("content")
                    or ""
                    for line in s.iter_lines()
                    if line.startswith("data: {")
                )
            assert streamed == text
        pre = httpx.get(records["prefill"]["url"] + "/metrics", timeout=10).text
        dec = httpx.get(records["decode"]["url"] + "/metrics", timeout=10).text
        # The prefill engine saw the two P/D requests with max_tokens 1 (plus the direct one).
        assert _metric(pre, "vllm:request_params_max_tokens_bucket", 'le="1.0"') >= 2
        # The decode engine took prompt tokens from the connector, over NIXL.
        assert _metric(dec, "vllm:prompt_tokens_by_source_total", "external_kv_transfer") > 0
        assert _metric(dec, "vllm:nixl_xfer_time_seconds_count") >= 2
    finally:
        stop_all_engines(home)


# -- the seeds' PDSeparationConfig drives it (fakes as the instances) --------------------


def test_seed_pd_config_with_a_connector_runs_the_pd_path(home):
    from sagellm_cli import (
        ControlPlaneManager,
        ExecutionInstance,
        ExecutionInstanceType,
        PDSeparationConfig,
        RequestMetadata,
    )
    from sagellm_cli.core.errors import BadInput
    from sagellm_cli.seed.manager import stop_all

    with pytest.raises(BadInput, match="kv_connector must be one of"):
        PDSeparationConfig(kv_connector="Nope")
    with FakeUpstream(kv_params=KV) as pre, FakeUpstream() as dec:
        manager = ControlPlaneManager(
            enable_pd_separation=True, pd_config=PDSeparationConfig(kv_connector="NixlConnector")
        )
        try:
            assert manager.routing_strategy == "pd"
            records = {
                name: manager.register_instance(
                    ExecutionInstance(instance_id=name, host="127.0.0.1", port=fake.port,
                                      model_name="fake", instance_type=kind)
                )
                for name, fake, kind in (("p1", pre, ExecutionInstanceType.PREFILLING),
                                         ("d1", dec, ExecutionInstanceType.DECODING))
            }  # fmt: skip
            assert {r.spec.kv_connector for r in records.values()} == {"NixlConnector"}

            async def run():
                rid = await manager.submit_request(RequestMetadata(prompt="hi", max_tokens=4))
                result = await manager.wait_for_result(rid, 60)
                await manager.stop()
                return result

            result = asyncio.run(run())
            assert result.engine == records["d1"].id
            assert [b["max_tokens"] for b in pre.bodies] == [1]
            assert dec.bodies[0]["kv_transfer_params"] == KV and dec.bodies[0]["max_tokens"] == 4
        finally:
            stop_all()
    # Without a connector the seeds' PD separation stays length routing.
    plain = ControlPlaneManager(enable_pd_separation=True)
    assert plain.routing_strategy == "length"
