"""`sage llm preset apply/down` on real engines: the tiny chat model and MiniLM.

Kept small for CI: one chat engine start for the happy path; the rollback tests pair a
fast embedding engine with the engine that fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import textwrap
from pathlib import Path

import pytest
from conftest import needs_st, needs_vllm, sage, sage_json

from sagellm_cli.core.launchers.process import group_members

pytestmark = [pytest.mark.engines, needs_vllm, needs_st]

APPLY_TIMEOUT = 900  # seconds for one `sage` call; engines load slowly on a busy 2-core box


def write_preset(tmp_path: Path, name: str, *engines: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    text = f"version: 1\nname: {name}\ndescription: test\nengines:\n"
    for engine in engines:
        text += textwrap.indent(textwrap.dedent(engine).lstrip("\n"), "  ")
    path.write_text(text)
    return path


def chat_engine(model) -> str:
    return f"""
    - name: chat
      kind: llm
      model: {model}
      max_model_len: 512
      kv_cache_gb: 0.0625
    """


EMBED = """
- name: embed
  kind: embedding
  model: all-MiniLM-L6-v2
"""


def records(home: Path, preset: str | None = None) -> list[dict]:
    data = sage_json("llm", "engine", "list", "--all", home=home)
    return [r for r in data if preset is None or r["preset"] == preset]


def state(home: Path) -> dict:
    return json.loads((home / "state.json").read_text())


def assert_nothing_left(home: Path, preset: str) -> None:
    """No process of any engine of the preset, no live record, no reservation."""
    for record in records(home, preset):
        assert record["status"] in ("stopped", "failed"), record
        left = group_members(record["pgid"], record["started_at"])
        assert not left, f"engine {record['id']} left processes {[p.pid for p in left]}"
    assert state(home)["reservations"] == {}


def apply(home: Path, path: Path, *args: str, json_out: bool = True):
    extra = ("--json",) if json_out else ()
    return sage(
        "llm", "preset", "apply", "--file", str(path), *args, *extra,
        home=home, timeout=APPLY_TIMEOUT,
    )  # fmt: skip


def test_apply_noop_restart_remove_down(home, tmp_path, tiny_model):
    path = write_preset(tmp_path, "tp", chat_engine(tiny_model), EMBED)

    first = apply(home, path, json_out=False)
    assert first.returncode == 0, first.stderr
    assert "is up" in first.stderr and "tp-chat" in first.stdout
    live = {r["label"]: r for r in records(home, "tp")}
    assert set(live) == {"tp-chat", "tp-embed"}
    assert all(r["status"] == "ready" and r["preset"] == "tp" for r in live.values())
    assert state(home)["presets"]["tp"]["engines"] == {k: v["id"] for k, v in live.items()}

    # Applying again is a no-op.
    again = apply(home, path)
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert result["noop"] is True and result["started"] == []
    assert {r["id"] for r in result["kept"]} == {r["id"] for r in live.values()}

    # A dead engine of the preset is restarted (same id); the healthy one is kept.
    embed = live["tp-embed"]
    os.killpg(embed["pgid"], signal.SIGKILL)
    restarted = apply(home, path)
    assert restarted.returncode == 0, restarted.stderr
    result = json.loads(restarted.stdout)
    assert [r["id"] for r in result["started"]] == [embed["id"]]
    assert [r["id"] for r in result["kept"]] == [live["tp-chat"]["id"]]

    # An engine removed from the file is stopped only with --yes.
    only_chat = write_preset(tmp_path, "tp", chat_engine(tiny_model))
    refused = apply(home, only_chat, json_out=False)
    assert refused.returncode == 2
    assert "tp-embed" in refused.stderr and "--yes" in refused.stderr
    removed = apply(home, only_chat, "--yes")
    assert removed.returncode == 0, removed.stderr
    assert json.loads(removed.stdout)["removed"] == [embed["id"]]
    assert {r["label"] for r in records(home, "tp") if r["status"] == "ready"} == {"tp-chat"}

    down = sage_json("llm", "preset", "down", "tp", home=home, timeout=120)
    assert [r["id"] for r in down["stopped"]] == [live["tp-chat"]["id"]]
    assert_nothing_left(home, "tp")
    assert "tp" not in state(home)["presets"]
    # Down again is a no-op.
    assert sage_json("llm", "preset", "down", "tp", home=home)["stopped"] == []


def _assert_rolled_back(home: Path, proc, failing_label: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert f"engine {failing_label!r} failed" in proc.stderr
    assert "rolled back 2 engine(s)" in proc.stderr
    # The failing engine's own exception is in the error line; its traceback stays in its
    # log (`sage llm engine logs`), not on the terminal.
    [error] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert re.search(r"exited during load.*: (\w+\.)*\w*(Error|Exception)\b", error), error
    assert "Traceback" not in proc.stderr and 'File "' not in proc.stderr
    result = json.loads(proc.stdout)
    assert result["ok"] is False and len(result["rolled_back"]) == 2
    assert result["failures"][0]["label"] == failing_label
    assert_nothing_left(home, "rb")
    assert "rb" not in state(home)["presets"]


def test_rollback_when_model_is_missing(home, tmp_path):
    # Not a local path (that is refused at plan time, exit 2) but a hub id that is not
    # cached: the plan notes it, the engine starts and fails offline, apply rolls back.
    path = write_preset(tmp_path, "rb", EMBED, chat_engine("sagellm-test/no-such-model"))
    proc = apply(home, path)
    _assert_rolled_back(home, proc, "rb-chat")


def test_rollback_when_engine_crashes_after_spawn(home, tmp_path, broken_model):
    path = write_preset(tmp_path, "rb", EMBED, chat_engine(broken_model))
    proc = apply(home, path)
    _assert_rolled_back(home, proc, "rb-chat")
    assert "exited during load" in proc.stderr


def test_ctrl_c_stops_what_apply_started(home, tmp_path):
    import subprocess
    import sys
    import time

    path = write_preset(tmp_path, "rb", EMBED)
    env = {**os.environ, "SAGELLM_HOME": str(home)}
    cmd = [sys.executable, "-m", "sagellm_cli", "llm", "preset", "apply", "-f", str(path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (home / "state.json").exists() and any(
                r.get("pid") for r in state(home)["engines"].values()
            ):
                break
            time.sleep(0.2)
        else:
            pytest.fail("apply never spawned its engine")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted: stopped 1 engine(s)" in err.decode()
    assert_nothing_left(home, "rb")
