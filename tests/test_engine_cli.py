"""Cheap CLI checks with Typer's CliRunner: parsing, exit codes, JSON shapes."""

from __future__ import annotations

import json
import socket

import pytest
from conftest import invoke


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert "sagellm-cli" in result.output


def test_list_empty_json(home):
    result = invoke("llm", "engine", "list", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == []


def test_unknown_engine_exits_3(home):
    result = invoke("llm", "engine", "stop", "nope-nope")
    assert result.exit_code == 3
    assert "no engine 'nope-nope'" in result.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--engine-kind", "video"], "unknown engine kind"),
        (["--engine-kind", "llm", "--runtime", "sentence-transformers"], "can't serve llm"),
        (["--env", "NOVALUE"], "is not K=V"),
        (["--gpus", "a,b"], "comma-separated"),
        (["--role", "boss"], "unknown role"),
        (["--placement", "everywhere"], "unknown placement"),
    ],
)
def test_bad_input_exits_2_before_spawning(home, args, needle):
    result = invoke("llm", "engine", "start", "some-model", *args)
    assert result.exit_code == 2, result.output
    assert needle in result.stderr
    assert not (home / "logs").exists() or not list((home / "logs").iterdir())


def test_usage_error_exits_2():
    result = invoke("llm", "engine", "start")
    assert result.exit_code == 2


def test_port_in_use_exits_4(home):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = invoke("llm", "engine", "start", "m", "--port", str(port), "--no-wait")
    assert result.exit_code == 4
    assert f"port {port}" in result.stderr
    assert json.loads(invoke("llm", "engine", "list", "--all", "--json").stdout) == []


def test_stop_requires_target(home):
    assert invoke("llm", "engine", "stop").exit_code == 2
