"""The management API is the control surface of the machine: every finding of the security
review, reproduced against a real `sage llm serve`, with the fixed behaviour asserted.

Where a test needs something to route to without a real engine (request-parsing checks),
benchmarks/fake_upstream.py stands in, to isolate the gateway's own code. The test of
secrets reaching engines and of `serve --stop` starts a real MiniLM embedding engine.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import needs_st, sage, sage_json
from test_gateway_support import add_engine_record, fake_upstream, free_port, running_gateway

from sagellm_cli.core.state import StateStore

ENGINES = "/management/engines"


def _records(home) -> dict:
    path = home / "state.json"
    return StateStore(path).read().engines if path.exists() else {}


def _sagellm_engine_processes(home: Path) -> list[psutil.Process]:
    """Engine processes of `home` only: other test workers run engines of their own."""
    found = []
    for proc in psutil.process_iter(["environ"]):
        try:
            env = proc.info["environ"] or {}
            if "SAGELLM_ENGINE_ID" in env and env.get("SAGELLM_HOME") == str(home):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _assert_nothing_started(home, before: list[psutil.Process]) -> None:
    assert _records(home) == {}
    assert {p.pid for p in _sagellm_engine_processes(home)} <= {p.pid for p in before}


def test_csrf_shaped_post_is_refused_and_starts_nothing(home):
    before = _sagellm_engine_processes(home)
    body = json.dumps({"model": "x", "env": {"PYTHONWARNINGS": "ignore::x", "BROWSER": "sh -c id"}})
    with running_gateway(home) as gw:
        # A "simple" cross-site request: text/plain, a foreign Origin and a rebound Host.
        r = httpx.post(
            gw.v1 + ENGINES + "?wait=false",
            content=body,
            headers={
                "Content-Type": "text/plain",
                "Origin": "http://evil.example",
                "Host": "attacker.example",
            },
        )
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "forbidden"
        # The same from a page on the right Host but another Origin.
        r = httpx.post(
            gw.v1 + ENGINES + "?wait=false",
            content=body,
            headers={"Content-Type": "text/plain", "Origin": "http://evil.example"},
        )
        assert r.status_code == 403 and "Origin" in r.json()["error"]["message"]
        # No Origin, but no token either.
        r = httpx.post(gw.v1 + ENGINES, content=body, headers={"Content-Type": "text/plain"})
        assert r.status_code == 401
        # With the token, text/plain is still refused: management POSTs are JSON only.
        r = httpx.post(
            gw.v1 + ENGINES, content=body, headers={**gw.admin, "Content-Type": "text/plain"}
        )
        assert r.status_code == 415
        # And the env itself is refused even as JSON with the token.
        r = httpx.post(gw.v1 + ENGINES + "?wait=false", content=body,
                       headers={**gw.admin, "Content-Type": "application/json"})  # fmt: skip
        assert r.status_code == 403 and "PYTHONWARNINGS" in r.json()["error"]["message"]
        _assert_nothing_started(home, before)


def test_foreign_host_never_reads_records(home):
    with running_gateway(home) as gw, fake_upstream() as (port, proc):
        add_engine_record(home, "fake0001", port, proc.pid)
        with StateStore(home / "state.json").transaction() as state:
            state.engines["fake0001"].spec.env = {"HF_TOKEN": "hf_secret"}
        foreign = {**gw.admin, "Host": "attacker.example"}
        r = httpx.get(gw.v1 + ENGINES, headers=foreign)
        assert r.status_code == 403 and "hf_secret" not in r.text
        # Inference and /v1/models refuse a rebound Host too.
        assert httpx.get(gw.v1 + "/models", headers={"Host": "attacker.example"}).status_code == 403
        # With the right Host the record is there, and the secret is masked.
        r = httpx.get(gw.v1 + ENGINES, headers=gw.admin)
        assert r.status_code == 200 and "hf_secret" not in r.text
        assert r.json()[0]["spec"]["env"] == {"HF_TOKEN": "***"}
        # Loopback names and addresses are the gateway's own.
        for host in ("localhost", f"localhost:{gw.port}", f"127.0.0.1:{gw.port}"):
            assert httpx.get(gw.url + "/health", headers={"Host": host}).status_code == 200
        own = {"Origin": gw.url}
        assert httpx.get(gw.v1 + "/models", headers=own).status_code == 200
    with running_gateway(home, "--allowed-host", "llm.internal") as gw:
        ok = httpx.get(gw.v1 + ENGINES, headers={**gw.admin, "Host": "llm.internal"})
        assert ok.status_code == 200


def test_management_needs_the_admin_token_never_the_api_key(home):
    with running_gateway(home, "--api-key", "inference-key") as gw:
        token = (home / "admin-token").read_text().strip()
        assert len(token) >= 32
        # The token file is private, in a private directory.
        assert stat.S_IMODE((home / "admin-token").stat().st_mode) == 0o600
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        for headers in ({}, {"Authorization": "Bearer inference-key"}, {"Authorization": "x"}):
            r = httpx.get(gw.v1 + ENGINES, headers=headers)
            assert r.status_code == 401, headers
            assert r.json()["error"]["type"] == "authentication_error"
            r = httpx.get(gw.v1 + "/management/status", headers=headers)
            assert r.status_code == 401
        assert httpx.get(gw.v1 + ENGINES, headers=gw.admin).status_code == 200
        # The inference key opens inference only.
        models = httpx.get(gw.v1 + "/models", headers={"Authorization": "Bearer inference-key"})
        assert models.status_code == 200
    shown = sage("llm", "serve", "--show-admin-token", home=home, check=True)
    assert shown.stdout.strip() == token


def test_the_same_token_survives_restarts_and_env_overrides_it(home):
    first = sage("llm", "serve", "--show-admin-token", home=home, check=True).stdout.strip()
    again = sage("llm", "serve", "--show-admin-token", home=home, check=True).stdout.strip()
    assert first == again
    env = {"SAGELLM_ADMIN_TOKEN": "from-env"}
    with running_gateway(home, env=env) as gw:
        ok = httpx.get(gw.v1 + ENGINES, headers={"Authorization": "Bearer from-env"})
        assert ok.status_code == 200
        assert httpx.get(gw.v1 + ENGINES, headers=gw.admin).status_code == 401


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": 123}, "model"),
        ({"model": "m", "tensor_parallel": "2"}, "tensor_parallel"),
        ({"model": "m", "port": "abc"}, "port"),
        ({"model": "m", "extra_args": "--foo"}, "extra_args"),
        ({"model": "m", "env": {"A": 1}}, "env.A"),
        ({"model": "m", "label": ["x"]}, "label"),
        ({"model": "m", "kv_cache_gb": "nan"}, "kv_cache_gb"),
        ({"model": "m", "modle": "x"}, "modle"),
        ({"kind": "llm"}, "model"),
        (["model"], "JSON object"),
    ],
)
def test_each_bad_body_is_a_400_naming_the_field(home, body, field):
    with running_gateway(home) as gw:
        r = httpx.post(gw.v1 + ENGINES + "?wait=false", json=body, headers=gw.admin)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert field in error["message"] and error["type"] == "invalid_request_error"
        assert _records(home) == {}


def test_bad_query_parameters_are_400_and_later_engines_still_route(home):
    with running_gateway(home) as gw, fake_upstream() as (port, proc):
        for query in ("timeout=abc", "timeout=-1", "timeout=inf", "wait=maybe"):
            r = httpx.post(f"{gw.v1}{ENGINES}?{query}", json={"model": "m"}, headers=gw.admin)
            assert r.status_code == 400 and query.split("=")[0] in r.text, query
        assert httpx.delete(f"{gw.v1}{ENGINES}/x?timeout=-5", headers=gw.admin).status_code == 400
        assert _records(home) == {}
        # The gateway still picks up engines registered afterwards.
        add_engine_record(home, "fake0001", port, proc.pid)
        chat = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
        deadline = time.monotonic() + 5
        while httpx.post(gw.v1 + "/chat/completions", json=chat).status_code != 200:
            assert time.monotonic() < deadline, "engine not routable"
            time.sleep(0.1)


@pytest.mark.parametrize(
    ("body", "word"),
    [
        ({"model": "m", "env": {"LD_PRELOAD": "/tmp/x.so"}}, "LD_PRELOAD"),
        ({"model": "m", "env": {"BROWSER": "sh"}}, "BROWSER"),
        ({"model": "m", "env": {"VLLM_PLUGINS": "evil"}}, "VLLM_PLUGINS"),
        ({"model": "m", "host": "0.0.0.0"}, "loopback"),
        ({"model": "m", "extra_args": ["--trust-remote-code"]}, "trust-remote-code"),
        ({"model": "m", "extra_args": ["--trust_remote_code=1"]}, "trust_remote_code"),
        ({"model": "m", "extra_args": ["--trust-rem"]}, "trust-rem"),
        ({"model": "m", "extra_args": ["--tool-parser-plugin", "/tmp/p.py"]}, "tool-parser"),
    ],
)
def test_the_api_cannot_ask_for_code_execution(home, body, word):
    before = _sagellm_engine_processes(home)
    with running_gateway(home) as gw:
        r = httpx.post(gw.v1 + ENGINES + "?wait=false", json=body, headers=gw.admin)
        assert r.status_code == 403, r.text
        message = r.json()["error"]["message"]
        assert word in message and "--allow-remote-engine-config" in message
    _assert_nothing_started(home, before)


def test_deep_json_and_bad_messages_are_400_never_500(home):
    deep_list = "[" * 5000 + "]" * 5000
    deep_obj = '{"a":' * 5000 + "1" + "}" * 5000
    with fake_upstream() as (port, proc):
        add_engine_record(home, "fake0001", port, proc.pid)
        for routing in ("prefix", "length"):
            with running_gateway(home, "--routing", routing) as gw:
                for raw in (deep_list, deep_obj):
                    r = httpx.post(gw.v1 + "/chat/completions", content=raw,
                                   headers={"Content-Type": "application/json"})  # fmt: skip
                    assert r.status_code == 400, r.text
                    r = httpx.post(gw.v1 + ENGINES, content=raw,
                                   headers={**gw.admin, "Content-Type": "application/json"})  # fmt: skip
                    assert r.status_code == 400 and "nest" in r.text
                for messages in (5, True, "hi", [5], [{"role": "user", "content": 5}],
                                 [{"role": "user", "content": [{"type": "text", "text": 5}]}],
                                 [{"role": "user", "content": [7]}]):  # fmt: skip
                    body = {"model": "fake", "messages": messages}
                    r = httpx.post(gw.v1 + "/chat/completions", json=body)
                    assert r.status_code == 400, (routing, messages, r.text)
                    assert r.json()["error"]["code"] == "invalid_messages"
                ok = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
                assert httpx.post(gw.v1 + "/chat/completions", json=ok).status_code == 200
                assert "Traceback" not in gw.log_text()


def test_management_body_limit(home):
    with running_gateway(home, "--max-body-mb", "1") as gw:
        big = b'{"model": "' + b"x" * (2 * 1024 * 1024) + b'"}'
        r = httpx.post(gw.v1 + ENGINES, content=big,
                       headers={**gw.admin, "Content-Type": "application/json"})  # fmt: skip
        assert r.status_code == 413

        def chunks():  # no Content-Length: the limit must hold while reading
            yield b'{"model": "'
            for _ in range(64):
                yield b"x" * 65536
            yield b'"}'

        r = httpx.post(gw.v1 + ENGINES, content=chunks(),
                       headers={**gw.admin, "Content-Type": "application/json"})  # fmt: skip
        assert r.status_code == 413
        assert _records(home) == {}


def test_last_resort_handler_gives_an_openai_500_with_a_logged_id(home, caplog):
    import asyncio

    from sagellm_cli.gateway.config import GatewayConfig
    from sagellm_cli.gateway.http.app import Gateway

    gateway = Gateway(GatewayConfig(port=1, admin_token="t"), StateStore(home / "state.json"))

    async def boom(*args, **kwargs):
        raise RuntimeError("secret internals")

    def broken_list(**kwargs):
        raise KeyError("inner")

    gateway.proxy.handle = boom
    gateway.management.manager.list = broken_list

    async def main():
        transport = httpx.ASGITransport(app=gateway, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            for method, path, headers in (
                ("POST", "/v1/chat/completions", {}),
                ("GET", "/v1/management/engines", {"Authorization": "Bearer t"}),
            ):
                r = await client.request(method, path, json={}, headers=headers)
                assert r.status_code == 500
                error = r.json()["error"]
                assert error["type"] == "server_error" and error["error_id"] in error["message"]
                assert "Traceback" not in r.text and "secret internals" not in r.text
                assert error["error_id"] in caplog.text

    asyncio.run(main())


def test_cli_warns_about_secrets_on_the_command_line(home):
    with running_gateway(home, "--api-key", "k", "--admin-token", "a") as gw:
        pass
    log = gw.log_text()
    assert "--api-key on the command line" in log and "SAGELLM_API_KEY" in log
    assert "--admin-token on the command line" in log


@needs_st
def test_engines_never_get_gateway_secrets_and_survive_serve_stop(home):
    env = {"SAGELLM_ADMIN_TOKEN": "admin-secret", "SAGELLM_API_KEY": "api-secret"}
    record = None
    try:
        gw = sage_json(
            "llm", "serve", "--background", "--port", str(free_port()), home=home, env=env
        )
        url = gw["url"]
        admin = {"Authorization": "Bearer admin-secret"}
        r = httpx.post(
            url + "/v1" + ENGINES,
            json={
                "model": "all-MiniLM-L6-v2",
                "engine_kind": "embedding",
                "env": {"HF_TOKEN": "hf-secret", "OMP_NUM_THREADS": "1"},
            },
            headers=admin,
            timeout=300,
        )
        assert r.status_code == 201, r.text
        record = r.json()
        assert record["spec"]["env"] == {"HF_TOKEN": "***", "OMP_NUM_THREADS": "1"}
        listed = httpx.get(url + "/v1" + ENGINES, headers=admin).text
        assert "hf-secret" not in listed and "admin-secret" not in listed
        cli = sage("llm", "engine", "list", "--json", home=home, check=True).stdout
        assert "hf-secret" not in cli
        engine = psutil.Process(record["pid"])
        environ = engine.environ()
        assert "SAGELLM_ADMIN_TOKEN" not in environ and "SAGELLM_API_KEY" not in environ
        assert environ["HF_TOKEN"] == "hf-secret"
        assert "admin-secret" not in (home / "logs" / f"{record['id']}.log").read_text()
        # The engine is not the gateway's child: stopping the gateway leaves it running.
        gateway_pid = gw["pid"]
        assert engine.pid not in {c.pid for c in psutil.Process(gateway_pid).children(True)}
        stopped = sage_json("llm", "serve", "--stop", home=home)
        assert stopped["stopped"] is True
        assert not psutil.pid_exists(gateway_pid) or psutil.Process(gateway_pid).status() == (
            psutil.STATUS_ZOMBIE
        )
        assert engine.is_running()
        vectors = httpx.post(f"{record['url']}/v1/embeddings",
                             json={"input": ["still here"]}, timeout=60)  # fmt: skip
        assert vectors.status_code == 200
        listed = sage_json("llm", "engine", "list", home=home)
        assert [e["status"] for e in listed] == ["ready"]
    finally:
        sage("llm", "serve", "--stop", home=home)
        sage("llm", "engine", "stop", "--all", home=home)
    if record is not None:
        assert not psutil.pid_exists(record["pid"])


def test_a_key_given_only_as_env_is_not_warned_about(home):
    env = {"SAGELLM_API_KEY": "k"}
    with running_gateway(home, env=env) as gw:
        pass
    assert "on the command line" not in gw.log_text()


def test_secret_flag_values_are_masked_in_json_output(home, tiny_model):
    plan = sage_json("llm", "preset", "apply", "--file", str(_secret_preset(home, tiny_model)),
                     "--dry-run", home=home)  # fmt: skip
    text = json.dumps(plan)
    assert "sk-hidden" not in text and "hf-hidden" not in text
    engine = plan["engines"][0]
    assert engine["env"]["HF_TOKEN"] == "***" and engine["env"]["OMP_NUM_THREADS"] == "1"
    assert "--api-key" in engine["command"] and "***" in engine["command"]


def _secret_preset(home, model) -> os.PathLike:
    path = home.parent / "secret.yaml"
    path.write_text(
        "version: 1\nname: secret\nengines:\n"
        f"  - name: chat\n    kind: llm\n    model: {model}\n    use_gpu: false\n"
        "    extra_args: [--api-key, sk-hidden]\n"
        "    env: {HF_TOKEN: hf-hidden, OMP_NUM_THREADS: 1}\n"
    )
    return path
