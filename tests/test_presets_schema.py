"""Cheap preset checks: schema errors with lines and suggestions, built-ins, plans, dry runs.

Nothing here starts an engine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from conftest import invoke as sage_cli

ROOT = Path(__file__).resolve().parent.parent
SEED_003_ENGINES = [
    {"name": "chat", "kind": "llm", "model": "Qwen/Qwen2.5-1.5B-Instruct",
     "tensor_parallel": 1, "label": "chat-qwen15b"},
    {"name": "embed", "kind": "embedding", "model": "BAAI/bge-small-zh-v1.5",
     "label": "embedding-bge"},
    {"name": "embed-gpu", "kind": "embedding", "model": "BAAI/bge-m3", "use_gpu": True,
     "label": "embedding-bge-m3-gpu"},
]  # fmt: skip


def invoke(*args: str):
    return sage_cli("llm", "preset", *args)


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


GOOD = """
version: 1
name: demo
description: two engines
engines:
  - name: chat
    kind: llm
    model: {model}
    max_model_len: 512
    kv_cache_gb: 0.0625
  - name: embed
    kind: embedding
    model: all-MiniLM-L6-v2
"""


# --------------------------------------------------------------------------- schema errors

BASE = """
version: 1
name: demo
engines:
  - name: chat
    kind: llm
    model: m/x
"""


@pytest.mark.parametrize(
    ("text", "line", "needles"),
    [
        # unknown key inside an engine: key, engine, line, suggestion
        (BASE + "    tensor_paralel: 2\n", 7,
         ["unknown key 'tensor_paralel'", "engine 'chat'", "did you mean 'tensor_parallel'"]),
        (BASE.replace("    model: m/x\n", "    modle: m/x\n"), 6,
         ["unknown key 'modle'", "did you mean 'model'"]),
        # unknown top-level key
        (BASE.replace("name: demo", "name: demo\ndescripton: hi"), 3,
         ["unknown key 'descripton'", "did you mean 'description'"]),
        # unknown key with nothing close: no suggestion
        (BASE + "    zzzzzz: 1\n", 7, ["unknown key 'zzzzzz'"]),
        # bad types
        (BASE + "    port: '8000'\n", 7, ["key 'port'", "valid integer", "engine 'chat'"]),
        (BASE + "    use_gpu: maybe\n", 7, ["key 'use_gpu'", "valid boolean"]),
        (BASE + "    extra_args: --foo\n", 7, ["key 'extra_args'", "valid list"]),
        (BASE + "    extra_args: [--dtype, 16]\n", 7, ["key 'extra_args[1]'"]),
        (BASE + "    replicas: 0\n", 7, ["key 'replicas'", "greater than or equal to 1"]),
        (BASE.replace("kind: llm", "kind: video"), 5, ["key 'kind'", "'llm' or 'embedding'"]),
        (BASE + "    role: boss\n", 7, ["key 'role'", "'general', 'prefill' or 'decode'"]),
        (BASE + "    tensor_parallel: 1.5\n", 7, ["key 'tensor_parallel'"]),
        # missing required key: the line of the engine's mapping
        (BASE.replace("    model: m/x\n", ""), 4, ["missing required key 'model'"]),
        # version
        (BASE.replace("version: 1", "version: 2"), 1, ["unsupported version 2"]),
        # duplicates
        (BASE + "  - name: chat\n    kind: llm\n    model: y/z\n", 7,
         ["duplicate engine name 'chat'"]),
        (BASE + "    model: again\n", 7, ["duplicate key 'model' (first at line 6)"]),
        (BASE + "  - name: two\n    kind: llm\n    model: y/z\n    label: demo-chat\n", 10,
         ["label 'demo-chat' is also used by engine 'chat'"]),
        (BASE + "    port: 9000\n  - name: b\n    kind: llm\n    model: y/z\n    port: 9000\n",
         11, ["port 9000 is also used by engine 'chat'"]),
        # YAML syntax
        (BASE + "    env: {A: [\n", 8, ["invalid YAML"]),
        ("version: 1\nname: demo\nengines: []\n", 3, ["key 'engines'", "at least 1"]),
        ("- just\n- a list\n", 1, ["top level must be a mapping"]),
    ],
)  # fmt: skip
def test_schema_errors_name_file_line_and_fix(tmp_path, text, line, needles):
    path = write(tmp_path, text)
    result = invoke("validate", "--file", str(path))
    assert result.exit_code == 2, result.output
    err = result.stderr
    assert "Traceback" not in err
    assert f"{path}:{line}:" in err, err
    for needle in needles:
        assert needle in err, err


def test_all_problems_listed_and_json(tmp_path):
    path = write(tmp_path, BASE.replace("    model: m/x\n", "    modle: m/x\n    prot: 1\n"))
    result = invoke("validate", "--file", str(path), "--json")
    assert result.exit_code == 2
    data = json.loads(result.stdout)
    assert data["valid"] is False
    by_key = {p["key"]: p for p in data["problems"]}
    assert by_key["modle"]["line"] == 6 and by_key["modle"]["suggestion"] == "model"
    assert by_key["prot"]["line"] == 7 and by_key["prot"]["suggestion"] == "port"
    assert by_key["prot"]["engine"] == "chat"
    assert "missing required key 'model'" in by_key["model"]["message"]
    # The first line printed is the misspelling, which explains the missing key.
    assert "unknown key 'modle'" in result.stderr.splitlines()[-1]


def test_env_numbers_become_strings(tmp_path):
    path = write(tmp_path, BASE + "    env: {OMP_NUM_THREADS: 2}\n")
    assert invoke("validate", "--file", str(path)).exit_code == 0


def test_missing_file_exits_3(tmp_path):
    result = invoke("validate", "--file", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 3
    assert "does not exist" in result.stderr


# --------------------------------------------------------------------------- built-ins


def test_builtin_presets_list_and_validate(home):
    result = invoke("list", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert {"qwen-mini-with-embeddings", "qwen-lite", "local-demo"} <= set(rows)
    assert rows["qwen-mini-with-embeddings"]["engines"] == 3
    assert rows["qwen-lite"]["engines"] == 1
    assert rows["local-demo"]["engines"] == 2
    for name, row in rows.items():
        assert Path(row["file"]).stem == name
        assert invoke("validate", name).exit_code == 0
        assert row["description"]


def test_seed_003_preset_is_exact():
    import yaml

    data = yaml.safe_load((ROOT / "presets" / "qwen-mini-with-embeddings.yaml").read_text())
    assert data["version"] == 1
    assert data["engines"] == SEED_003_ENGINES


def test_unknown_builtin_exits_3_with_suggestion(home):
    result = invoke("show", "qwen-lit")
    assert result.exit_code == 3
    assert "did you mean 'qwen-lite'" in result.stderr


def test_show_json_has_engines_and_plan(home, tmp_path, tiny_model):
    path = write(tmp_path, GOOD.format(model=tiny_model))
    result = invoke("show", "--file", str(path), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [e["name"] for e in data["engines"]] == ["chat", "embed"]
    assert data["plan"]["engines"][0]["action"] == "start"


# --------------------------------------------------------------------------- plan / dry run


def _dry_run(path: Path, *extra: str):
    return invoke("apply", "--file", str(path), "--dry-run", *extra)


def test_dry_run_changes_nothing(home, tmp_path, tiny_model):
    # A state file with content: the dry run must leave it byte-for-byte as it was.
    from sagellm_cli.core.records import AppliedPreset
    from sagellm_cli.core.state import StateStore

    state = home / "state.json"
    with StateStore(state).transaction() as doc:
        doc.presets["x"] = AppliedPreset()
    before, mtime = state.read_bytes(), state.stat().st_mtime_ns
    path = write(tmp_path, GOOD.format(model=tiny_model))
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}

    result = _dry_run(path, "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["dry_run"] is True and plan["preset"] == "demo"
    chat, embed = plan["engines"]
    assert chat["label"] == "demo-chat" and embed["label"] == "demo-embed"
    assert chat["model"]["exists_locally"] and embed["model"]["exists_locally"]
    assert chat["action"] == "start" and chat["gpus"] == []
    assert chat["command"][1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert "--max-model-len" in chat["command"] and "512" in chat["command"]
    assert str(chat["port"]) in chat["command"] and chat["port"] != embed["port"]
    assert "sagellm_cli.servers.embedding" in embed["command"]

    human = _dry_run(path)
    assert human.exit_code == 0
    assert "demo-chat" in human.stdout and "vllm.entrypoints.openai.api_server" in human.stdout

    assert state.read_bytes() == before
    assert state.stat().st_mtime_ns == mtime
    assert not (home / "logs").exists()
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= children_before


def test_dry_run_does_not_create_state_file(home, tmp_path, tiny_model):
    path = write(tmp_path, GOOD.format(model=tiny_model))
    assert _dry_run(path).exit_code == 0
    assert not (home / "state.json").exists()


def test_missing_model_path_is_bad_input(home, tmp_path):
    path = write(tmp_path, GOOD.format(model=tmp_path / "no-such-model"))
    result = _dry_run(path)
    assert result.exit_code == 2
    assert "engine 'demo-chat'" in result.stderr and "does not exist" in result.stderr


def test_uncached_bare_llm_name_points_to_model_prepare(home, tmp_path):
    """The dry run plans it and says what blocks it; the real apply refuses (exit 2)
    before anything starts."""
    path = write(tmp_path, GOOD.format(model="gemma-3-270m-not-here"))
    result = _dry_run(path)
    assert result.exit_code == 0
    assert "cannot start yet" in result.stdout and "sage llm model" in result.stdout
    applied = invoke("apply", "--file", str(path))
    assert applied.exit_code == 2 and "sage llm model" in applied.stderr


def test_requested_port_in_use_exits_4(home, tmp_path, tiny_model):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        text = GOOD.format(model=tiny_model) + f"    port: {port}\n"
        result = invoke("apply", "--file", str(write(tmp_path, text)))
    assert result.exit_code == 4, result.output
    assert f"port {port}" in result.stderr and "demo-embed" in result.stderr
    assert not (home / "logs").exists()


GPU_PRESET = """
version: 1
name: gpus
engines:
  - name: a
    kind: llm
    model: org/big-model
    use_gpu: true
    gpu_memory_gb: {a}
  - name: b
    kind: llm
    model: org/big-model
    use_gpu: true
    gpu_memory_gb: {b}
    replicas: {replicas}
"""


def test_plan_refused_for_lack_of_gpu_memory(home, tmp_path, monkeypatch):
    monkeypatch.setenv("SAGELLM_MOCK_GPUS", "1x8")
    path = write(tmp_path, GPU_PRESET.format(a=20, b=1, replicas=1))
    result = invoke("apply", "--file", str(path))
    assert result.exit_code == 4, result.output
    assert "engine 'gpus-a'" in result.stderr
    assert not (home / "logs").exists()
    assert (
        not (home / "state.json").exists()
        or '"reservations": {}' in (home / "state.json").read_text()
    )


def test_plan_places_all_engines_cumulatively(home, tmp_path, monkeypatch):
    monkeypatch.setenv("SAGELLM_MOCK_GPUS", "2x8")
    # Each engine fits on its own; all of them together need a third GPU.
    ok = write(tmp_path, GPU_PRESET.format(a=5, b=5, replicas=1), "ok.yaml")
    result = _dry_run(ok, "--json")
    assert result.exit_code == 0, result.output
    gpus = [e["gpus"] for e in json.loads(result.stdout)["engines"]]
    assert sorted(g[0] for g in gpus) == [0, 1]
    too_many = write(tmp_path, GPU_PRESET.format(a=5, b=5, replicas=2), "many.yaml")
    result = _dry_run(too_many)
    assert result.exit_code == 4, result.output
    assert "engine 'gpus-b-2'" in result.stderr


def test_replicas_expand_with_labels(home, tmp_path, tiny_model):
    text = GOOD.format(model=tiny_model).replace("    kv_cache_gb: 0.0625\n", "    replicas: 3\n")
    result = _dry_run(write(tmp_path, text), "--json")
    assert result.exit_code == 0, result.output
    labels = [e["label"] for e in json.loads(result.stdout)["engines"]]
    assert labels == ["demo-chat-1", "demo-chat-2", "demo-chat-3", "demo-embed"]


# --------------------------------------------------------------------------- removal needs --yes


def test_removed_engines_need_yes(home, tmp_path, tiny_model):
    """An engine of the preset that left the file is only stopped with --yes."""
    from sagellm_cli.core.records import EngineRecord
    from sagellm_cli.core.state import StateStore

    sleeper = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        proc = psutil.Process(sleeper.pid)
        record = EngineRecord(
            id="deadbeef", kind="llm", runtime="vllm", model="m", served_model_name="m",
            host="127.0.0.1", port=1, label="demo-old", status="ready", pid=sleeper.pid,
            pgid=sleeper.pid, pid_create_time=proc.create_time(), created_at=time.time(),
            started_at=time.time(), preset="demo",
        )  # fmt: skip
        with StateStore().transaction() as state:
            state.engines[record.id] = record
        path = write(tmp_path, GOOD.format(model=tiny_model))
        plan = json.loads(_dry_run(path, "--json").stdout)
        assert plan["remove"] == [{"id": "deadbeef", "label": "demo-old", "model": "m", "port": 1}]
        result = invoke("apply", "--file", str(path))
        assert result.exit_code == 2, result.output
        assert "demo-old (deadbeef)" in result.stderr and "--yes" in result.stderr
        assert sleeper.poll() is None  # not stopped
        assert not (home / "logs").exists()  # nothing started
    finally:
        os.killpg(sleeper.pid, signal.SIGKILL)
        sleeper.wait()


@pytest.mark.parametrize(
    "name", ["local-demo", "qwen-lite", "qwen-mini-with-embeddings", "qwen-pd-one-gpu"]
)
def test_every_builtin_preset_plans_offline_on_a_mock_gpu(home, monkeypatch, name):
    """The headline commands plan on any GPU box, even before a model is downloaded."""
    monkeypatch.setenv("SAGELLM_MOCK_GPUS", "1x80")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke("apply", "-n", name, "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    for engine in plan["engines"]:
        if engine["gpus"]:
            assert engine["gib_per_gpu"] > 0
    unknown = [e for e in plan["engines"] if any("conservative" in n for n in e["notes"])]
    for engine in unknown:  # a model of unknown size is planned with a stated default
        assert engine["placement"]["estimate"]["params_source"] == "unknown"


def test_a_top_level_cluster_applies_to_every_engine_that_names_none(tmp_path):
    from sagellm_cli.core.presets.loader import load_file

    path = tmp_path / "c.yaml"
    path.write_text(
        "version: 1\nname: c\ncluster: 10.0.0.1:6379\nengines:\n"
        "  - {name: a, model: m}\n"
        "  - {name: b, model: m, cluster: 10.0.0.2:6379}\n"
        "  - {name: x, url: 'http://10.0.0.3:8000'}\n"
    )
    a, b, x = load_file(path).config.engines
    assert (a.cluster, b.cluster, x.cluster) == ("10.0.0.1:6379", "10.0.0.2:6379", None)


def _squash(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


def test_every_builtin_description_names_each_of_its_engines():
    """What `preset list` says a built-in starts is what it starts: every engine's model
    (its name after the organisation) appears in the description."""
    from sagellm_cli.core.presets.loader import list_builtin

    for preset in list_builtin():
        description = _squash(preset.config.description)
        for engine in preset.config.engines:
            model = engine.model.rsplit("/", 1)[-1]
            assert _squash(model) in description, (preset.name, engine.model)


def test_the_headline_preset_plans_whole_on_a_machine_without_a_gpu(home, monkeypatch):
    """No GPU (NVML off): the built-in's `use_gpu: true` falls back to the CPU with a note,
    and every engine is planned (the seed's first example must work on any machine)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke("apply", "-n", "qwen-mini-with-embeddings", "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["startable"] is True
    engines = {e["label"]: e for e in plan["engines"]}
    assert set(engines) == {"chat-qwen15b", "embedding-bge", "embedding-bge-m3-gpu"}
    assert all(e["gpus"] == [] and e["blocker"] is None for e in engines.values())
    m3 = engines["embedding-bge-m3-gpu"]
    assert any("runs on the CPU instead" in n for n in m3["notes"])
    assert (
        "--device" in m3["command"] and m3["command"][m3["command"].index("--device") + 1] == "cpu"
    )


def test_a_users_own_use_gpu_true_is_strict_and_names_the_preset_field(home, tmp_path):
    """The same engines in the user's own file: the dry run still shows the whole plan,
    marking the one that cannot be placed, and exits 4 as apply does; apply names the
    field and the file, and starts nothing."""
    own = tmp_path / "mine.yaml"
    own.write_text((ROOT / "presets" / "qwen-mini-with-embeddings.yaml").read_text())
    result = _dry_run(own, "--json")
    assert result.exit_code == 4, result.stderr
    plan = json.loads(result.stdout)
    assert plan["startable"] is False
    blockers = {e["label"]: e["blocker"] for e in plan["engines"]}
    assert blockers["chat-qwen15b"] is None and blockers["embedding-bge"] is None
    assert "no GPU available" in blockers["embedding-bge-m3-gpu"]
    applied = invoke("apply", "--file", str(own))
    assert applied.exit_code == 4, applied.output
    line = applied.stderr.strip()
    assert "embedding-bge-m3-gpu" in line and "`use_gpu: true`" in line and str(own) in line
    assert "--use-gpu" not in line and "Traceback" not in applied.stderr
    assert not (home / "logs").exists()
