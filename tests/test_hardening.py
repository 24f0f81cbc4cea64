"""Hostile inputs end as one `error:` line and a documented exit code, never a traceback.

YAML bombs, a scratch dir someone else owns, bad hosts, nan/inf sizes, negative timeouts
and damaged state files. Commands that could start an engine if a check regressed are
given `--port` of a port that is already listening, so they stop at exit 4 instead.
"""

from __future__ import annotations

import json
import math
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import sage

from sagellm_cli.core import paths
from sagellm_cli.core.errors import BadInput, StateCorrupted
from sagellm_cli.core.state import StateStore, decode_state

ENGINE_ID = "abcd1234"


def _one_error_line(proc: subprocess.CompletedProcess, code: int) -> str:
    """Assert exit `code` and exactly one `error:` line on stderr; return that line."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    assert "internal error" not in lines[0] and "Traceback" not in proc.stderr
    return lines[0]


@pytest.fixture
def busy_port():
    """A port something already listens on: a start that got past validation ends at exit 4."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield str(sock.getsockname()[1])


# --------------------------------------------------------------------------- 1. YAML bombs


def _bomb_text(levels: int = 9, width: int = 10) -> str:
    lines = ["version: 1", "name: bomb", "a: &a [" + ",".join(['"x"'] * width) + "]"]
    previous = "a"
    for name in "bcdefghijklmnop"[: levels - 1]:
        lines.append(f"{name}: &{name} [" + ",".join([f"*{previous}"] * width) + "]")
        previous = name
    return "\n".join(lines) + "\n"


def _validate_limited(path: Path, home: Path) -> tuple[subprocess.CompletedProcess, float]:
    """`preset validate --file path` with 1 GiB of address space: a bomb would die, not swap."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    began = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "sagellm_cli", "llm", "preset", "validate", "--file", str(path)],
        env={**os.environ, "SAGELLM_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=limit,
    )
    return proc, time.monotonic() - began


def test_yaml_alias_bomb_is_refused_quickly(home, tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_bomb_text())
    assert bomb.stat().st_size < 500
    proc, elapsed = _validate_limited(bomb, home)
    line = _one_error_line(proc, 2)
    assert str(bomb) in line and "too complex" in line
    assert elapsed < 10


def test_yaml_deep_nesting_is_refused(home, tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 10_000 + "]" * 10_000 + "\n")
    proc, elapsed = _validate_limited(deep, home)
    line = _one_error_line(proc, 2)
    assert str(deep) in line and "nested" in line
    assert elapsed < 10


def test_yaml_alias_count_is_capped():
    from sagellm_cli.core.presets.schema import PresetInvalid, load_yaml

    text = "a: &a x\nb: [" + ",".join(["*a"] * 101) + "]\n"
    with pytest.raises(PresetInvalid, match="more than 100 aliases"):
        load_yaml(text, "many.yaml")


def test_yaml_ordinary_anchors_and_merges_still_load(home, tmp_path):
    preset = tmp_path / "merge.yaml"
    preset.write_text(
        "version: 1\nname: merged\n"
        "x-common: &common {kind: embedding, model: all-MiniLM-L6-v2}\n"
        "engines:\n  - {<<: *common, name: one}\n  - {<<: *common, name: two}\n"
    )
    # The anchor key is not part of the schema; what matters is that it gets that far.
    proc = sage("llm", "preset", "validate", "--file", str(preset), home=home)
    line = _one_error_line(proc, 2)
    assert "x-common" in line and "too complex" not in line


# --------------------------------------------------------------------------- 2. scratch dir


def _spoil(root: Path, how: str) -> None:
    if how == "symlink":
        target = root.parent / "elsewhere"
        (target / ENGINE_ID).mkdir(parents=True)
        (target / ENGINE_ID / "keep").write_text("not sagellm's")
        root.symlink_to(target)
    elif how == "other-owner":
        root.mkdir(mode=0o700)
        os.chown(root, 65534, 65534)
    else:  # readable by others
        root.mkdir()
        os.chmod(root, 0o755)


SPOILS = [
    "symlink",
    pytest.param(
        "other-owner",
        marks=pytest.mark.skipif(os.getuid() != 0, reason="chown to another user needs root"),
    ),
    "mode-0755",
]


@pytest.mark.parametrize("how", SPOILS)
def test_scratch_dir_falls_back_to_the_state_dir(home, tmp_path, monkeypatch, how):
    import tempfile

    tmp = tmp_path / "t"
    tmp.mkdir()
    _spoil(tmp / f"sagellm-{os.getuid()}", how)
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() caches its answer
    scratch = paths.scratch_dir(ENGINE_ID)
    assert scratch == home / "tmp" / ENGINE_ID
    info = scratch.parent.lstat()
    assert info.st_uid == os.getuid() and info.st_mode & 0o777 == 0o700
    assert paths.scratch_dirs(ENGINE_ID) == [scratch]
    # Short enough for vLLM's unix sockets with the default state dir.
    assert len(str(Path.home() / ".local/state/sagellm/tmp" / ENGINE_ID)) < 60


@pytest.mark.parametrize("how", SPOILS)
def test_engine_list_all_survives_a_foreign_scratch_dir(home, tmp_path, how):
    tmp = tmp_path / "t"
    tmp.mkdir()
    _spoil(tmp / f"sagellm-{os.getuid()}", how)
    # A record of an engine that died: listing it reconciles it and removes its scratch dir.
    _write_state(home, _record(status="ready", pid=4_194_000, pgid=4_194_000))
    proc = sage("llm", "engine", "list", "--all", "--json", home=home, env={"TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stderr
    assert [r["status"] for r in json.loads(proc.stdout)] == ["failed"]
    if how == "symlink":  # clean-up never follows the planted link
        assert (tmp_path / "t" / "elsewhere" / ENGINE_ID / "keep").exists()


# --------------------------------------------------------------------------- 3. hosts


@pytest.mark.parametrize(
    ("host", "says"),
    [("[::1]", "without them: ::1"), ("no such host", "does not resolve")],
)
def test_engine_start_rejects_bad_hosts(home, busy_port, host, says):
    proc = sage("llm", "engine", "start", "m", "--no-wait", "--port", busy_port, "--host", host,
                home=home)  # fmt: skip
    assert says in _one_error_line(proc, 2)


def test_hosts_that_are_accepted():
    from sagellm_cli.core.launchers.ports import check_host

    for host in ("127.0.0.1", "0.0.0.0", "localhost"):
        check_host(host)
    with pytest.raises(BadInput):
        check_host("")
    try:  # IPv6 may be off in a container
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return
    check_host("::1")


def test_preset_with_a_bracketed_host_fails_the_plan(home, tmp_path):
    preset = tmp_path / "host.yaml"
    preset.write_text(
        "version: 1\nname: hostp\nengines:\n"
        "  - {name: e, kind: embedding, model: all-MiniLM-L6-v2, host: '[::1]'}\n"
    )
    proc = sage("llm", "preset", "apply", "--file", str(preset), "--dry-run", home=home)
    assert "brackets" in _one_error_line(proc, 2)


# --------------------------------------------------------------------------- 4. nan / inf


@pytest.mark.parametrize("option", ["--kv-cache-gb", "--gpu-memory-gb"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0"])
def test_engine_start_rejects_non_finite_sizes(home, busy_port, option, value):
    proc = sage("llm", "engine", "start", "m", "--no-wait", "--port", busy_port, option, value,
                home=home)  # fmt: skip
    assert "finite positive" in _one_error_line(proc, 2)


def test_validate_spec_rejects_non_finite_sizes():
    from sagellm_cli.core.engines.manager import validate_spec
    from sagellm_cli.core.records import EngineSpec

    for value in (math.nan, math.inf, -1.0):
        with pytest.raises(BadInput, match="finite positive"):
            validate_spec(EngineSpec(model="m", kv_cache_gb=value))
        with pytest.raises(BadInput, match="finite positive"):
            validate_spec(EngineSpec(model="m", gpu_memory_gb=value))


@pytest.mark.parametrize("key", ["kv_cache_gb", "gpu_memory_gb"])
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize("command", [["validate"], ["apply", "--dry-run"]])
def test_preset_rejects_non_finite_sizes(home, tmp_path, key, value, command):
    # Relies on the schema's floats refusing inf/nan (allow_inf_nan=False) for `validate`.
    preset = tmp_path / "sizes.yaml"
    preset.write_text(
        "version: 1\nname: sizes\nengines:\n"
        f"  - {{name: e, kind: embedding, model: all-MiniLM-L6-v2, {key}: {value}}}\n"
    )
    proc = sage("llm", "preset", command[0], "--file", str(preset), *command[1:], home=home)
    assert key in _one_error_line(proc, 2)


# --------------------------------------------------------------------------- 5. timeouts


@pytest.mark.parametrize(
    "args",
    [
        ["engine", "stop", ENGINE_ID, "--timeout", "-5"],
        ["engine", "stop", "--all", "--timeout", "nan"],
        ["engine", "start", "m", "--no-wait", "--timeout", "-1"],
        ["engine", "restart", ENGINE_ID, "--timeout", "inf"],
    ],
)
def test_negative_or_non_finite_timeouts(home, busy_port, args):
    extra = ["--port", busy_port] if args[1] == "start" else []
    proc = sage("llm", *args, *extra, home=home)
    assert "--timeout" in _one_error_line(proc, 2)


# --------------------------------------------------------------------------- 6-7. state file


def _record(**fields) -> dict:
    record = {
        "id": ENGINE_ID,
        "kind": "llm",
        "runtime": "vllm",
        "model": "m",
        "served_model_name": "m",
        "host": "127.0.0.1",
        "port": 47999,
        "status": "stopped",
        "created_at": 1.0,
    }
    record.update(fields)
    return record


def _state_text(**fields) -> str:
    return json.dumps({"version": 1, "engines": {ENGINE_ID: _record(**fields)}})


def _write_state(home: Path, record: dict) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "state.json").write_text(json.dumps({"version": 1, "engines": {ENGINE_ID: record}}))


BAD_STATES = {
    "huge-pid": '{"version": 1, "engines": {"x": {"pid": ' + "9" * 5000 + "}}}",
    "pid-string": _state_text(pid="abc"),
    "pid-float": _state_text(pid=1.5),
    "pid-bool": _state_text(pid=True),
    "pid-negative": _state_text(pid=-1),
    "pgid-zero": _state_text(pgid=0),
    "port-string": _state_text(port="80"),
    "gpus-strings": _state_text(gpus=["0"]),
    "created-nan": _state_text(created_at=math.nan),
    "id-path": _state_text(id="../../x"),
    "deep-json": "[" * 100_000,
    "deep-record": _state_text(spec={"a": json.loads("[" * 200 + "]" * 200)}),
    "empty": "",
    "version-true": '{"version": true}',
    "gateway-pid": '{"version": 1, "gateway": {"pid": "abc"}}',
    "reservation-nan": json.dumps(
        {"version": 1, "reservations": {"x": {"engine_id": "x", "gpus": [0], "gib_per_gpu": "nan"}}}
    ),
}


@pytest.mark.parametrize("name", list(BAD_STATES))
def test_bad_state_is_reported_not_crashed_on(home, name):
    home.mkdir(parents=True, exist_ok=True)
    (home / "state.json").write_text(BAD_STATES[name])
    with pytest.raises(StateCorrupted, match="is unreadable"):
        decode_state(BAD_STATES[name], home / "state.json")
    with pytest.raises(StateCorrupted), StateStore().transaction():
        pass
    assert (home / "state.json").read_text() == BAD_STATES[name]


@pytest.mark.parametrize("name", ["huge-pid", "pid-string", "pid-negative", "deep-json", "empty"])
@pytest.mark.parametrize(
    "args",
    [
        ["engine", "list"],
        ["engine", "list", "--all"],
        ["engine", "show", ENGINE_ID],
        ["engine", "stop", ENGINE_ID],
    ],
)
def test_engine_commands_report_a_bad_state_file(home, name, args):
    home.mkdir(parents=True, exist_ok=True)
    (home / "state.json").write_text(BAD_STATES[name])
    line = _one_error_line(sage("llm", *args, home=home), 1)
    assert f"state file {home / 'state.json'} is unreadable" in line
    assert (home / "state.json").read_text() == BAD_STATES[name]


def test_missing_state_file_is_an_empty_state(home):
    proc = sage("llm", "engine", "list", "--all", "--json", home=home)
    assert proc.returncode == 0 and json.loads(proc.stdout) == []


def test_good_state_still_decodes(home):
    text = _state_text(pid=123, pgid=123, gpus=[0, 1], cpu_cores=[2], created_at=5, exit_code=-9)
    record = decode_state(text, home / "state.json").engines[ENGINE_ID]
    assert (record.pid, record.gpus, record.created_at, record.exit_code) == (123, [0, 1], 5, -9)
