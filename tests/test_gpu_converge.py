"""Concurrent GPU starts that keep memory truth (issue 21), on the CPU: the KV budget
derived from a reservation, start modes and their gates, vLLM's phases from its own log
lines, the over-reservation mark and the apply that rolls back on it, restarts that keep
the compile cache's environment."""

from __future__ import annotations

import json
import queue
import time
from pathlib import Path

import pytest

from sagellm_cli.core.engines import logs
from sagellm_cli.core.engines.manager import _loading_before, _must_queue, pinned_env
from sagellm_cli.core.errors import BadInput, OperationFailed
from sagellm_cli.core.gpu import Placement
from sagellm_cli.core.gpu import kv_budget as kvb
from sagellm_cli.core.gpu.overuse import find_overuse, from_ledger, tolerance_gib
from sagellm_cli.core.gpu.plan import gpu_snapshot, kv_budget_for
from sagellm_cli.core.launchers.runtimes import build_launch
from sagellm_cli.core.records import EngineRecord, EngineSpec, GpuReservation
from sagellm_cli.core.state import State, StateStore

GIB = 1024**3
# The 1.2 B test model of scripts/gpu_device_run.sh (tests/tinymodel.py --hidden 2048
# --layers 24), as config.json describes it.
CONFIG_1B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 2048,
    "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "num_key_value_heads": 16, "vocab_size": 2048, "max_position_embeddings": 1024,
    "torch_dtype": "bfloat16",
}  # fmt: skip

# vLLM 0.24's own log lines for one GPU start, in order (messages as its source formats
# them: gpu_model_runner.py, default_loader.py, backends.py, monitor.py, gpu_worker.py,
# kv_cache_utils.py, api_server.py), behind its usual prefixes.
VLLM_START = [
    ("(EngineCore_DP0 pid=7) INFO 11-30 01:00:01 [gpu_model_runner.py:2338] Starting to "
     "load model /root/tiny...", "loading weights"),
    ("(EngineCore_DP0 pid=7) INFO 11-30 01:00:02 [default_loader.py:267] Loading weights "
     "took 0.00 seconds", "loading weights"),
    ("(EngineCore_DP0 pid=7) INFO 11-30 01:00:05 [backends.py:548] Dynamo bytecode transform "
     "time: 2.41 s", "compiling"),
    ("(EngineCore_DP0 pid=7) INFO 11-30 01:00:05 [backends.py:194] Directly load the compiled "
     "graph(s) for compile range (1, 8192) from the cache, took 0.140 s", "compiling"),
    ("(EngineCore_DP0 pid=7) INFO 11-30 01:00:06 [monitor.py:34] torch.compile took 0.93 s "
     "in total", "compiling"),
    ("(EngineCore_DP0 pid=7) INFO 11-30 01:00:07 [gpu_worker.py:298] Available KV cache "
     "memory: 5.14 GiB", "KV cache"),
    ("(EngineCore_DP0 pid=7) INFO 11-30 01:00:07 [kv_cache_utils.py:1087] GPU KV cache size: "
     "5,391,360 tokens", "KV cache"),
    ("(EngineCore_DP0 pid=7) INFO 11-30 01:00:07 [kv_cache_utils.py:1091] Maximum concurrency "
     "for 512 tokens per request: 10530.00x", "KV cache"),
    ("Capturing CUDA graphs (mixed prefill-decode, PIECEWISE): 100%|##########| 67/67",
     "capturing CUDA graphs"),
    ("(EngineCore_DP0 pid=7) INFO 11-30 01:00:11 [gpu_model_runner.py:3118] Graph capturing "
     "finished in 4 secs, took 0.12 GiB", "capturing CUDA graphs"),
    ("(APIServer pid=6) INFO 11-30 01:00:12 [api_server.py:1882] Starting vLLM API server 0 "
     "on http://127.0.0.1:8000", "starting server"),
]  # fmt: skip
KV_GIVEN = (
    "(EngineCore_DP0 pid=7) INFO 11-30 01:00:07 [gpu_worker.py:270] Initial free memory "
    "133.40 GiB, reserved 5.14 GiB memory for KV Cache as specified by kv_cache_memory_bytes "
    "config and skipped memory profiling."
)


@pytest.fixture
def model_1b(tmp_path) -> Path:
    folder = tmp_path / "m-1b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG_1B))
    return folder


@pytest.fixture(autouse=True)
def _mode(monkeypatch):
    monkeypatch.delenv(kvb.START_MODE_ENV, raising=False)


def placement(gib: float, budget=None, gpus=(0,)) -> Placement:
    return Placement(gpus=list(gpus), uuids=[f"GPU-{i}" for i in gpus], gib_per_gpu=gib,
                     total_gib=[140.0] * len(gpus), kv_budget=budget)  # fmt: skip


# --------------------------------------------------------------------------- KV budget


def test_kv_budget_is_the_reservation_minus_weights_activations_graphs_and_context(model_1b):
    spec = EngineSpec(model=str(model_1b), max_model_len=512)
    budget = kvb.derive_kv_budget(spec, "vllm", 20.0, 1)
    parts = budget.parts_gib
    assert budget.kv_bytes is not None and budget.reason == "derived from the reservation"
    assert parts["context"] == kvb.CONTEXT_GIB and parts["cuda_graphs"] == kvb.CUDA_GRAPHS_GIB
    assert 1.7 < parts["weights"] < 2.6  # ~1e9 parameters (config shapes) in bf16
    assert 0.2 < parts["activations"] < 1.0
    rest = 20.0 - parts["context"] - parts["weights"] - parts["activations"] - 0.3
    assert budget.kv_bytes == pytest.approx(rest * GIB, rel=1e-3)
    eager = kvb.derive_kv_budget(
        EngineSpec(model=str(model_1b), extra_args=["--enforce-eager"]), "vllm", 20.0, 1
    )
    assert eager.kv_bytes - budget.kv_bytes == pytest.approx(0.3 * GIB, rel=1e-2)


def test_kv_budget_falls_back_to_profiling_when_it_cannot_be_trusted(model_1b, tmp_path):
    unknown = kvb.derive_kv_budget(EngineSpec(model="org/not-here-7B"), "vllm", 30.0, 1)
    assert unknown.kv_bytes is None and "no local copy" in unknown.reason
    small = kvb.derive_kv_budget(EngineSpec(model=str(model_1b)), "vllm", 3.0, 1)
    assert small.kv_bytes is None and "one sequence needs" in small.reason
    st = kvb.derive_kv_budget(EngineSpec(model="m", kind="embedding"), "sentence-transformers",
                              2.0, 1)  # fmt: skip
    assert st.kv_bytes is None
    given = kvb.derive_kv_budget(EngineSpec(model="x", kv_cache_gb=0.5), "vllm", 4.0, 1)
    assert given.kv_bytes == GIB // 2


def test_start_mode_is_one_env_variable(monkeypatch, model_1b):
    spec = EngineSpec(model=str(model_1b))
    assert kvb.start_mode() == "concurrent"
    assert kv_budget_for(spec, 20.0, 1).kv_bytes is not None
    monkeypatch.setenv(kvb.START_MODE_ENV, "pipeline")
    piped = kv_budget_for(spec, 20.0, 1)
    assert piped.kv_bytes is None and "pipeline" in piped.reason
    monkeypatch.setenv(kvb.START_MODE_ENV, "fast")
    with pytest.raises(BadInput, match="SAGELLM_GPU_START_MODE='fast' is not a start mode"):
        kvb.start_mode()


def test_launch_gets_the_derived_kv_bytes_or_says_why_not(tmp_path, model_1b):
    spec = EngineSpec(model=str(model_1b))
    budget = kvb.derive_kv_budget(spec, "vllm", 20.0, 1)

    def launch(p):
        return build_launch(spec, runtime="vllm", port=8000, served_model_name="m",
                            placement=p, scratch_dir=tmp_path, cache_dir=None)  # fmt: skip

    argv = launch(placement(20.0, budget)).argv
    assert argv[argv.index("--kv-cache-memory-bytes") + 1] == str(budget.kv_bytes)
    assert "--gpu-memory-utilization" in argv  # vLLM's start-up check still uses it
    profiled = launch(placement(20.0, kvb.KvBudget(None, "start mode pipeline: vLLM profiles")))
    assert "--kv-cache-memory-bytes" not in profiled.argv
    assert any("start mode pipeline" in note for note in profiled.notes)


# --------------------------------------------------------------------------- gates


def rec(i, status, command=(), runtime="vllm", created=0.0, log=""):
    return EngineRecord(id=f"e{i}", kind="llm", runtime=runtime, model="m",
                        served_model_name="m", host="127.0.0.1", port=9000 + i, status=status,
                        gpus=[0], created_at=created or float(i), log_path=log,
                        command=list(command))  # fmt: skip


SIZED = ["python", "-m", "vllm", "--kv-cache-memory-bytes", "123"]


def test_engines_with_kv_bytes_load_together_on_one_gpu():
    state = State()
    state.engines["e1"] = rec(1, "starting", SIZED)
    sized = placement(6.0, kvb.KvBudget(123, "derived"))
    assert not _must_queue(state, EngineSpec(model="m"), "vllm", sized, None)
    # The embedding server doesn't read free memory, nor does an engine with KV bytes.
    state.engines["e2"] = rec(2, "starting", ["python", "-m", "emb"], "sentence-transformers")
    assert not _must_queue(state, EngineSpec(model="m"), "vllm", sized, None)


def test_an_engine_that_profiles_waits_for_the_kv_cache_line_not_for_ready(tmp_path):
    log = tmp_path / "e1.log"
    log.write_text("[sagellm] 2026-11-30 01:00:00 starting engine e1: python -m vllm\n")
    state = State()
    state.engines["e1"] = rec(1, "starting", SIZED, log=str(log))
    state.engines["e2"] = rec(2, "queued", ["python", "-m", "vllm"])  # profiles
    assert _loading_before(state, state.engines["e2"])
    with log.open("a") as fh:  # lines up to the KV cache, from vLLM 0.24
        fh.write("\n".join(line for line, _ in VLLM_START[:7]) + "\n")
    assert not _loading_before(state, state.engines["e2"])
    # A new start of e1 (same log, appended) is loading again until its own KV line.
    with log.open("a") as fh:
        fh.write("[sagellm] 2026-11-30 01:05:00 starting engine e1: python -m vllm\n")
    assert _loading_before(state, state.engines["e2"])
    # The embedding server never logs a KV line: a profiling neighbour waits until it's ready.
    state.engines["e1"].status = "ready"
    state.engines["e3"] = rec(3, "starting", ["python", "-m", "emb"], "sentence-transformers")
    assert _loading_before(state, state.engines["e2"])
    state.engines["e3"].status = "ready"
    assert not _loading_before(state, state.engines["e2"])


def test_phases_come_from_vllms_own_log_lines(tmp_path):
    path = tmp_path / "e.log"
    path.write_text("[sagellm] 2026-11-30 01:00:00 starting engine e1: python -m vllm\n")
    for line, phase in VLLM_START:
        with path.open("a") as fh:
            fh.write(line + "\n")
        assert logs.loading_view(path)[0] == phase, line
    path.write_text(KV_GIVEN + "\n")
    assert logs.loading_view(path)[0] == "KV cache"
    assert not logs.kv_cache_sized(path)  # sized, not yet allocated: the next line says so
    with path.open("a") as fh:
        fh.write(VLLM_START[6][0] + "\n")
    assert logs.kv_cache_sized(path)


# --------------------------------------------------------------------------- over-use


def test_over_use_is_judged_against_max_5_percent_or_half_a_gib():
    assert tolerance_gib(6.0) == 0.5 and tolerance_gib(20.0) == 1.0
    res = GpuReservation("e1", [0, 1], 6.0)
    assert find_overuse(res, {0: 6.4, 1: 6.5}) is None
    over = find_overuse(res, {0: 6.4, 1: 6.9})
    assert over.gpu == 1 and over.over_gib == pytest.approx(0.9)
    assert "engine e1 uses 6.90 GiB on GPU 1, 0.90 GiB over its 6.00 GiB reservation" in (
        over.message()
    )
    assert find_overuse(GpuReservation("e1", [0], 6.0, asleep_gib=1.0), {0: 9.0}) is None


def test_ready_engine_over_its_reservation_is_marked_and_the_apply_fails(home, monkeypatch):
    from sagellm_cli.core.engines.manager import EngineManager
    from sagellm_cli.core.gpu import overuse
    from sagellm_cli.core.presets.apply import _Apply

    store = StateStore()
    with store.transaction() as state:
        state.engines["e1"] = rec(1, "ready", SIZED)
        state.reservations["e1"] = GpuReservation("e1", [0], 6.0)
    manager = EngineManager(store)
    monkeypatch.setattr(overuse, "engine_usage", lambda state, engine_id: {0: 7.2})
    assert manager.check_gpu_use("e1").over_gib == pytest.approx(1.2)
    ledger = store.read().reservations["e1"]
    assert (ledger.over_gib, ledger.over_gpu) == (pytest.approx(1.2), 0)
    monkeypatch.setenv("SAGELLM_MOCK_GPUS", "1x140")
    assert gpu_snapshot(store.read()).usage(ledger)["over"]  # `sage llm gpu` shows OVER
    # preset apply: the waiter reports the engine failed (and the apply rolls back).
    monkeypatch.setattr(manager, "wait_ready", lambda *a, **k: store.read().engines["e1"])
    run = _Apply.__new__(_Apply)
    run.manager, run.timeout, run.done, run.on_event = manager, 5.0, queue.Queue(), None
    run.began = time.monotonic()
    run._wait_one("chat", "e1", time.monotonic())
    _, record, exc = run.done.get_nowait()
    assert record is None and isinstance(exc, OperationFailed)
    assert "1.20 GiB over its 6.00 GiB reservation" in exc.message
    # Back within the reservation: the mark goes.
    monkeypatch.setattr(overuse, "engine_usage", lambda state, engine_id: {0: 5.9})
    assert manager.check_gpu_use("e1") is None
    assert from_ledger(store.read().reservations["e1"]) is None


# --------------------------------------------------------------------------- restarts


def test_restarts_see_the_first_starts_compile_cache_environment():
    env = {"VLLM_CACHE_ROOT": "/c", "TORCHINDUCTOR_CACHE_DIR": "/i", "PATH": "/bin",
           "VLLM_API_KEY": "secret", "HF_TOKEN": "t", "XDG_CACHE_HOME": "/x"}  # fmt: skip
    assert pinned_env(env) == {
        "VLLM_CACHE_ROOT": "/c",
        "TORCHINDUCTOR_CACHE_DIR": "/i",
        "XDG_CACHE_HOME": "/x",
    }
    from sagellm_cli.core.engines.manager import _CARRIED

    assert "launch_env" in _CARRIED  # a restart under the same id keeps the first start's
