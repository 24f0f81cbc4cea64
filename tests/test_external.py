"""External engines (`sage llm engine register URL`): servers something else runs.

The "external" server here is a real MiniLM embedding server started by the test itself,
exactly as another team would run one (`python -m sagellm_cli.servers.embedding`, not
through sagellm): the gateway routes to it, health-checks it through `/v1/models`, drains
it when it dies, and `engine stop` only unregisters it while the process runs on.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import httpx
import pytest
from conftest import needs_st, sage, sage_json, wait_for
from test_gateway_support import _kill, free_port, running_gateway

from sagellm_cli.core.engines.external import Registration, normalise_url, register
from sagellm_cli.core.errors import BadInput

MINILM = "all-MiniLM-L6-v2"


@contextlib.contextmanager
def outside_server(tmp_path):
    """A MiniLM server that sagellm did not start; killed afterwards whatever happens."""
    port = free_port()
    log = tmp_path / f"outside-{port}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sagellm_cli.servers.embedding", "--model", MINILM,
             "--served-model-name", "outside-emb", "--port", str(port), "--device", "cpu"],
            stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield url, proc
    finally:
        _kill(proc)


def test_urls_are_checked_before_anything_is_recorded(home):
    assert normalise_url("http://h:8000/v1/") == "http://h:8000"
    assert normalise_url("http://h/prefix/") == "http://h/prefix"
    bad_urls = (
        "ftp://h",
        "h:8000",
        "http://h:99999",
        "http://u:p@h:1",
        "http://h/?x=1",
        "https://h",
    )
    for bad in bad_urls:
        with pytest.raises(BadInput):
            normalise_url(bad)
    result = sage("llm", "engine", "register", "http://127.0.0.1:1", "--model", "m", home=home)
    assert result.returncode == 1 and "does not answer /v1/models" in result.stderr
    assert "Traceback" not in result.stderr
    result = sage("llm", "engine", "start", "m", "--runtime", "external", home=home)
    assert result.returncode == 2 and "engine register" in result.stderr


@needs_st
def test_a_registered_server_is_routed_health_checked_and_only_unregistered(home, tmp_path):
    with (
        outside_server(tmp_path) as (url, proc),
        running_gateway(home, "--health-interval", "0.5", "--supervise-interval", "0.3") as gateway,
    ):
        # Naming a model the server does not serve is refused, nothing recorded.
        wrong = sage("llm", "engine", "register", url, "--model", "nope", "-k", "embedding",
                     home=home)  # fmt: skip
        assert wrong.returncode == 2 and "outside-emb" in wrong.stderr
        record = sage_json("llm", "engine", "register", url + "/v1", "-k", "embedding",
                           "--label", "ext", home=home)  # fmt: skip
        assert record["runtime"] == "external" and record["url"] == url
        assert record["served_model_name"] == "outside-emb"  # its only model, from /v1/models
        assert record["served_models"] == ["outside-emb"]
        assert record["node"] == "external:127.0.0.1" and record["pid"] is None
        listed = sage("llm", "engine", "list", home=home, check=True).stdout
        assert "external:127.0.0.1" in listed

        body = {"model": "ext", "input": ["hello"]}
        answer = wait_for(  # the gateway picks the new record up
            lambda: (r := httpx.post(gateway.v1 + "/embeddings", json=body, timeout=30))
            .status_code == 200 and r,
            10, "the registered engine answers through the gateway",
        )  # fmt: skip
        assert answer.headers["x-sagellm-engine"] == record["id"]

        # The server dies: health checks (GET /v1/models) drain it; no process of ours
        # was watched, and the record is not failed by a liveness check.
        _kill(proc)
        wait_for(
            lambda: not httpx.get(gateway.v1 + "/models").json()["data"][0]["ready"],
            15, "the dead external engine is drained",
        )  # fmt: skip
        answer = httpx.post(gateway.v1 + "/embeddings", json=body, timeout=30)
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "no_ready_engine"
        engines = httpx.get(gateway.v1 + "/management/engines", headers=gateway.admin).json()
        assert [e["status"] for e in engines] == ["ready"]  # registered still, just drained


@needs_st
def test_stop_unregisters_without_signalling_and_the_api_registers_too(home, tmp_path):
    with outside_server(tmp_path) as (url, proc), running_gateway(home) as gateway:
        api = gateway.v1 + "/management/engines/register"
        refused = httpx.post(api, json={"url": url, "bogus": 1}, headers=gateway.admin)
        assert refused.status_code == 400 and "bogus" in refused.text
        metadata = httpx.post(api, json={"url": "http://169.254.169.254"}, headers=gateway.admin)
        assert metadata.status_code == 403
        assert httpx.post(api, json={"url": url}).status_code == 401
        created = httpx.post(api, json={"url": url, "kind": "embedding", "label": "ext"},
                             headers=gateway.admin)  # fmt: skip
        assert created.status_code == 201, created.text
        engine_id = created.json()["id"]

        stopped = sage("llm", "engine", "stop", "ext", home=home, check=True)
        assert "unregistered" in stopped.stderr
        assert proc.poll() is None  # still running: it was never ours to stop
        assert httpx.get(url + "/v1/models", timeout=5).status_code == 200
        record = sage_json("llm", "engine", "show", engine_id, home=home)
        assert record["status"] == "stopped"
        restart = sage("llm", "engine", "restart", engine_id, home=home)
        assert restart.returncode == 2 and "not ours" in restart.stderr


def test_register_in_code_checks_the_model(home):
    from sagellm_cli.core.engines.manager import EngineManager

    record = register(
        EngineManager(), Registration("http://10.1.2.3:8000", "m", "llm", check=False)
    )
    assert record.url == "http://10.1.2.3:8000" and record.status == "ready"
    assert EngineManager().list()[0].id == record.id  # never failed by a liveness check


@needs_st
def test_a_preset_lists_an_external_engine_by_url(home, tmp_path):
    preset = tmp_path / "mixed.yaml"
    with outside_server(tmp_path) as (url, proc):
        preset.write_text(
            "version: 1\nname: mixed\nengines:\n"
            f"  - {{name: remote, kind: embedding, url: '{url}/v1'}}\n"
        )
        plan = sage_json("llm", "preset", "apply", "--file", str(preset), "--dry-run", home=home)
        assert [e["action"] for e in plan["engines"]] == ["start"]
        assert plan["engines"][0]["url"] == url
        applied = sage_json("llm", "preset", "apply", "--file", str(preset), home=home)
        engines = sage_json("llm", "engine", "list", home=home)
        assert [
            (e["label"], e["runtime"], e["served_model_name"], e["preset"]) for e in engines
        ] == [("mixed-remote", "external", "outside-emb", "mixed")], applied
        again = sage_json("llm", "preset", "apply", "--file", str(preset), "--dry-run", home=home)
        assert [e["action"] for e in again["engines"]] == ["keep"]  # idempotent
        sage("llm", "preset", "down", "mixed", home=home, check=True)
        assert sage_json("llm", "engine", "list", home=home) == []
        assert proc.poll() is None  # unregistered, never signalled
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nname: b\nengines:\n  - {name: x, kind: llm}\n")
    result = sage("llm", "preset", "validate", "--file", str(bad), home=home)
    assert result.returncode == 2 and "missing required key 'model'" in result.stderr
