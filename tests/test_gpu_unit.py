"""GPU estimation, placement and the ledger, on CPU: mock GPUs and a fake NVML."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import struct
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from conftest import sage

from sagellm_cli.core.errors import BadInput, ExitCode, ResourceUnavailable
from sagellm_cli.core.gpu import Placement, capacities, choose_gpus, plan_gpu, read_inventory
from sagellm_cli.core.gpu.estimate import (
    UNKNOWN_SIZE_GIB,
    estimate_memory,
    layout_for_gpu_count,
    params_from_config,
    params_from_name,
    read_weights,
    recommend_layouts,
)
from sagellm_cli.core.gpu.inventory import (
    GpuProcess,
    engine_pid_map,
    mock_inventory,
    nvml_inventory,
)
from sagellm_cli.core.gpu.placement import HEADROOM_GIB, gpu_memory_utilization
from sagellm_cli.core.records import EngineRecord, EngineSpec, GpuReservation
from sagellm_cli.core.state import State, StateStore

GIB = 1024**3

# Llama-3-8B's published shapes (8.03e9 parameters).
LLAMA3_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "max_position_embeddings": 8192,
    "torch_dtype": "bfloat16",
}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Private state dir and HF cache; no mock GPUs unless a test sets them."""
    monkeypatch.setenv("SAGELLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("SAGELLM_DISABLE_NVML", "1")
    monkeypatch.delenv("SAGELLM_MOCK_GPUS", raising=False)
    monkeypatch.delenv("SAGELLM_MOCK_NVLINK", raising=False)


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A valid safetensors file with zero-filled data (no torch needed)."""
    sizes = {"F32": 4, "BF16": 2, "F16": 2, "I32": 4}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def llm(model="org/m-7B", **kw) -> EngineSpec:
    return EngineSpec(model=model, kind="llm", **kw)


# --------------------------------------------------------------------------- estimation


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Qwen/Qwen2.5-1.5B-Instruct", 1.5e9),
        ("google/gemma-3-270m", 270e6),
        ("meta-llama/Llama-3.1-70B-Instruct", 70e9),
        ("mistralai/Mixtral-8x7B-v0.1", 56e9),
        ("Qwen/Qwen3-30B-A3B", 30e9),  # A3B (active parameters) is not the size
        ("microsoft/Phi-3-mini-4k-instruct", None),  # 4k is a context length
        ("all-MiniLM-L6-v2", None),
    ],
)
def test_params_from_name(name, expected):
    assert params_from_name(name) == expected


def test_params_from_config_matches_published_sizes():
    assert params_from_config(LLAMA3_8B) == pytest.approx(8.03e9, rel=0.02)
    qwen05 = {
        "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "vocab_size": 151936, "tie_word_embeddings": True,
    }  # fmt: skip
    assert params_from_config(qwen05) == pytest.approx(494e6, rel=0.03)


def test_weights_from_local_safetensors_are_exact(tmp_path):
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"torch_dtype": "float32"}))
    write_safetensors(model / "model.safetensors", {"a": ("F32", [1000, 64]), "b": ("F32", [64])})
    w = read_weights(str(model))
    assert (w.params, w.source, w.checkpoint_bytes) == (64064, "safetensors", 64064 * 4)


def test_weights_from_hf_cache_index_without_shards(tmp_path):
    snap = tmp_path / "hf" / "models--acme--big" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    index = {"metadata": {"total_size": 16 * GIB}, "weight_map": {"x": "model-00001.safetensors"}}
    (snap / "model.safetensors.index.json").write_text(json.dumps(index))
    w = read_weights("acme/big")
    assert w.source == "safetensors-index"
    assert w.params == pytest.approx(8 * GIB)


def test_weights_from_hf_cache_config_beat_the_name(tmp_path):
    snap = tmp_path / "hf" / "models--meta-llama--Llama-3-8B" / "snapshots" / "x"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(LLAMA3_8B))
    w = read_weights("meta-llama/Llama-3-8B")
    assert w.source == "config"
    assert w.params == pytest.approx(8.03e9, rel=0.02)


def test_estimate_parts_and_split_over_tp_pp(tmp_path):
    snap = tmp_path / "hf" / "models--meta-llama--Llama-3-8B" / "snapshots" / "x"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(LLAMA3_8B))
    one = estimate_memory("meta-llama/Llama-3-8B", max_model_len=8192)
    assert one.dtype == "bfloat16" and one.bytes_per_param == 2
    assert one.weights_gib == pytest.approx(8.03e9 * 2 / GIB, rel=0.02)
    # K+V per token: 2 x 32 layers x 8 heads x 128 dims x 2 bytes = 128 KiB, for 16k tokens.
    assert one.kv_gib_per_gpu == pytest.approx(2.0, rel=0.01)
    assert one.gib_per_gpu == pytest.approx(one.weights_gib + 2.0 + 2.0, abs=0.11)
    four = estimate_memory("meta-llama/Llama-3-8B", tensor_parallel=2, pipeline_parallel=2)
    assert four.weights_gib_per_gpu == pytest.approx(one.weights_gib / 4, rel=1e-3)
    assert four.gib_per_gpu < one.gib_per_gpu
    long_ctx = estimate_memory("meta-llama/Llama-3-8B", max_model_len=65536)
    assert long_ctx.kv_gib_per_gpu == pytest.approx(8.0, rel=0.01)


def test_estimate_override_kv_budget_embedding_and_quantized():
    assert estimate_memory("whatever", gpu_memory_gb=12.5).gib_per_gpu == 12.5
    kv = estimate_memory("org/m-7B", kv_cache_gb=3.0)
    assert kv.kv_gib_per_gpu == 3.0
    emb = estimate_memory("acme/e5-110M", kind="embedding")
    assert (emb.dtype, emb.bytes_per_param) == ("float32", 4.0)
    assert emb.gib_per_gpu == pytest.approx(110e6 * 4 / GIB + 0.5 + 1.0, abs=0.11)
    awq = estimate_memory("TheBloke/Llama-2-13B-AWQ")
    plain = estimate_memory("meta-llama/Llama-2-13B")
    assert awq.dtype == "4-bit"
    assert awq.weights_gib < plain.weights_gib / 3


def test_an_unknown_model_is_planned_with_a_stated_conservative_size(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    est = estimate_memory("acme/mystery")
    assert est.params is None and est.params_source == "unknown"
    assert est.gib_per_gpu == UNKNOWN_SIZE_GIB["llm"]
    assert "conservative" in est.notes[0] and "gpu_memory_gb" in est.notes[0]
    assert estimate_memory("acme/mystery", kind="embedding").gib_per_gpu == 4.0


@pytest.mark.parametrize(
    ("params", "layouts"),
    [
        (1.5e9, [(1, 1), (2, 1)]),
        (13e9, [(4, 1)]),
        (34e9, [(4, 1), (8, 1)]),
        (70.6e9, [(4, 1), (8, 1)]),
        (120e9, [(4, 2)]),
        (405e9, [(8, 4)]),
    ],
)
def test_recommended_tp_pp_table(params, layouts):
    assert recommend_layouts(params)[1] == layouts


def test_layout_for_gpu_count():
    assert layout_for_gpu_count(2) == (2, 1)
    assert layout_for_gpu_count(16) == (8, 2)
    with pytest.raises(BadInput):
        layout_for_gpu_count(12)


# --------------------------------------------------------------------------- placement


def inv(spec="2x80", nvlink=None, used=None, procs=None):
    """A mock inventory; `used` = {index: GiB occupied}, `procs` = {index: [GpuProcess]}."""
    inventory = mock_inventory(spec, nvlink)
    for g in inventory.gpus:
        gib = (used or {}).get(g.index, 0)
        g.memory_used_mib = int(gib * 1024)
        g.memory_free_mib = g.memory_total_mib - g.memory_used_mib
        g.processes = (procs or {}).get(g.index, [])
    return inventory


def state_with(*reservations: GpuReservation) -> State:
    state = State()
    for r in reservations:
        state.reservations[r.engine_id] = r
    return state


def test_pack_is_best_fit_and_spread_takes_the_emptiest():
    state = state_with(GpuReservation("e1", [1], 30.0, mock=True))
    inventory = inv("2x80")
    pack = plan_gpu(llm(gpu_memory_gb=20), state, inventory=inventory)
    spread = plan_gpu(llm(gpu_memory_gb=20, placement="spread"), state, inventory=inventory)
    assert pack.gpus == [1]
    assert spread.gpus == [0]


def test_pinned_gpus_and_bad_pins():
    state, inventory = State(), inv("2x80")
    assert plan_gpu(llm(gpu_memory_gb=10, gpus=[1]), state, inventory=inventory).gpus == [1]
    with pytest.raises(BadInput, match="GPU 5, which does not exist"):
        plan_gpu(llm(gpu_memory_gb=10, gpus=[5]), state, inventory=inventory)
    with pytest.raises(BadInput, match="lists 1 GPU but tensor_parallel x pipeline_parallel = 2"):
        plan_gpu(llm(gpu_memory_gb=10, gpus=[0], tensor_parallel=2), state, inventory=inventory)
    full = state_with(GpuReservation("e1", [0], 75.0, mock=True))
    with pytest.raises(ResourceUnavailable, match="pinned GPU 0"):
        plan_gpu(llm(gpu_memory_gb=10, gpus=[0]), full, inventory=inventory)


def test_tp_prefers_nvlinked_sets_over_best_fit():
    # Best fit alone would take GPUs 0 and 2 (the fullest); they are not NVLinked.
    state = state_with(
        GpuReservation("a", [0], 40.0, mock=True), GpuReservation("b", [2], 40.0, mock=True)
    )
    inventory = inv("4x80", nvlink="0,1;2,3")
    placed = plan_gpu(llm(gpu_memory_gb=20, tensor_parallel=2), state, inventory=inventory)
    assert set(placed.gpus) in ({0, 1}, {2, 3})
    no_links = plan_gpu(llm(gpu_memory_gb=20, tensor_parallel=2), state, inventory=inv("4x80"))
    assert set(no_links.gpus) == {0, 2}


def test_pipeline_parallel_needs_tp_times_pp_gpus():
    placed = plan_gpu(
        llm(gpu_memory_gb=10, tensor_parallel=2, pipeline_parallel=2),
        State(),
        inventory=inv("4x80"),
    )
    assert sorted(placed.gpus) == [0, 1, 2, 3]
    with pytest.raises(ResourceUnavailable, match="needs 8 GPUs but 4 GPUs are present"):
        plan_gpu(llm(gpu_memory_gb=1, tensor_parallel=8), State(), inventory=inv("4x80"))


def test_no_fit_lists_every_gpu_and_the_need():
    state = state_with(
        GpuReservation("e1", [0], 60.0, mock=True), GpuReservation("e2", [1], 50.0, mock=True)
    )
    with pytest.raises(ResourceUnavailable) as err:
        plan_gpu(llm("org/big-7B", gpu_memory_gb=35), state, inventory=inv("2x80"))
    exc = err.value
    assert exc.exit_code == ExitCode.RESOURCE == 4
    text = exc.one_line()
    assert "needs 1 GPU with 35.0 GiB free" in text
    assert "GPU 0 (mock) Mock GPU: 20.0 GiB free of 80.0, 60.0 reserved by sagellm" in text
    assert "GPU 1 (mock) Mock GPU: 30.0 GiB free of 80.0, 50.0 reserved by sagellm" in text
    assert "\n" not in text


def test_running_engine_is_not_counted_twice():
    # e1 reserved 30 GiB and its process uses 20 GiB of it; a stranger uses 10 GiB.
    procs = {0: [GpuProcess(pid=11, used_mib=20 * 1024, engine_id="e1"), GpuProcess(12, 10240)]}
    cap = capacities(
        inv("1x80", used={0: 30}, procs=procs), [GpuReservation("e1", [0], 30.0, True)]
    )
    assert cap[0].other_used_gib == pytest.approx(10.0)
    assert cap[0].free_gib == pytest.approx(40.0)  # 80 - 10 (stranger) - 30 (e1 once)
    # An engine using more than it reserved is counted at its real use.
    procs = {0: [GpuProcess(pid=11, used_mib=45 * 1024, engine_id="e1")]}
    cap = capacities(
        inv("1x80", used={0: 45}, procs=procs), [GpuReservation("e1", [0], 30.0, True)]
    )
    assert cap[0].free_gib == pytest.approx(35.0)


def test_usage_of_an_engine_without_reservation_here_counts_as_used():
    procs = {0: [GpuProcess(pid=11, used_mib=20 * 1024, engine_id="cpu-engine")]}
    cap = capacities(inv("1x80", used={0: 20}, procs=procs), [])
    assert cap[0].free_gib == pytest.approx(60.0)


def test_mock_reservations_do_not_count_on_real_gpus_and_back():
    real = inv("1x80")
    real.mock = False
    for g in real.gpus:
        g.mock = False
    cap = capacities(real, [GpuReservation("e1", [0], 50.0, mock=True)])
    assert cap[0].free_gib == pytest.approx(80.0)


def test_headroom_is_required():
    inventory = inv("1x80")
    assert plan_gpu(llm(gpu_memory_gb=80 - HEADROOM_GIB), State(), inventory=inventory)
    with pytest.raises(ResourceUnavailable):
        plan_gpu(llm(gpu_memory_gb=80 - HEADROOM_GIB + 0.1), State(), inventory=inventory)


def test_placement_env_and_utilization():
    real = Placement(gpus=[1, 0], uuids=["GPU-b", "GPU-a"], gib_per_gpu=20.0, total_gib=[79.6, 80])
    assert real.env() == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "GPU-b,GPU-a"}
    # Two GPUs (TP 2): the budget leaves 1.6 GiB per rank for context and NCCL buffers.
    assert real.gpu_memory_utilization == 0.231  # (20 - 1.6) / 79.6 = 0.2311..., rounded down
    one = Placement(gpus=[0], uuids=["GPU-a"], gib_per_gpu=20.0, total_gib=[80.0])
    assert one.gpu_memory_utilization == 0.242  # (20 - 0.6) / 80 = 0.2425
    mock = Placement([2], ["GPU-mock-0002"], 30.0, [80.0], mock=True)
    assert mock.cuda_visible_devices == "2"
    assert gpu_memory_utilization(100, [80]) == 0.95
    assert gpu_memory_utilization(0.01, [80]) == 0.001
    assert mock.reservation("e9") == GpuReservation("e9", [2], 30.0, True)


def test_cpu_cases_return_none(monkeypatch):
    state = State()
    assert plan_gpu(llm(use_gpu=False), state) is None
    monkeypatch.setenv("SAGELLM_MOCK_GPUS", "1x80")
    assert plan_gpu(EngineSpec(model="all-MiniLM-L6-v2", kind="embedding"), state) is None
    emb = plan_gpu(EngineSpec(model="acme/e5-110M", kind="embedding", use_gpu=True), state)
    assert emb is not None and emb.mock and emb.gpus == [0]
    monkeypatch.delenv("SAGELLM_MOCK_GPUS")
    # No NVML: an llm falls back to vLLM's CPU build; --use-gpu is an error.
    assert plan_gpu(llm(), state) is None
    with pytest.raises(ResourceUnavailable, match="no GPU available: NVML disabled") as err:
        plan_gpu(llm(use_gpu=True), state)
    assert err.value.exit_code == 4


def test_bad_placement_and_parallel_sizes_are_bad_input():
    with pytest.raises(BadInput, match="unknown placement"):
        plan_gpu(llm(gpu_memory_gb=1, placement="random"), State(), inventory=inv())
    with pytest.raises(BadInput):
        plan_gpu(llm(gpu_memory_gb=1, tensor_parallel=0), State(), inventory=inv())


def test_malformed_mock_spec_is_bad_input(monkeypatch):
    monkeypatch.setenv("SAGELLM_MOCK_GPUS", "lots")
    with pytest.raises(BadInput, match="COUNTxGiB"):
        read_inventory()
    monkeypatch.setenv("SAGELLM_MOCK_GPUS", "2x80,1x40")
    assert [g.total_gib for g in read_inventory().gpus] == [80, 80, 40]


def test_choose_gpus_directly_is_pure():
    caps = capacities(inv("3x80"), [GpuReservation("x", [2], 70.0, True)])
    assert choose_gpus(caps, 5.0, 1, strategy="pack") == [2]
    assert choose_gpus(caps, 5.0, 1, strategy="spread") == [0]
    assert choose_gpus(caps, 5.0, 2, strategy="pack", tensor_parallel=2) == [0, 2]


# --------------------------------------------------------------------------- ledger under concurrency


def _start_one(home: str, engine_id: str, go, results) -> None:
    os.environ["SAGELLM_HOME"] = home
    os.environ["SAGELLM_MOCK_GPUS"] = "1x80"
    go.wait()
    try:
        with StateStore().transaction() as state:
            placement = plan_gpu(llm(gpu_memory_gb=20), state)
            time.sleep(0.05)  # widen the race window inside the lock
            state.reservations[engine_id] = placement.reservation(engine_id)
        results.put((engine_id, "ok"))
    except ResourceUnavailable as exc:
        results.put((engine_id, f"full: {exc.message}"))


def test_concurrent_starts_never_oversubscribe(tmp_path):
    ctx = multiprocessing.get_context("fork")
    go, results = ctx.Event(), ctx.Queue()
    home = str(tmp_path / "home")
    procs = [ctx.Process(target=_start_one, args=(home, f"e{i}", go, results)) for i in range(8)]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    outcomes = dict(results.get(timeout=5) for _ in procs)
    ok = [e for e, r in outcomes.items() if r == "ok"]
    # 80 GiB, 20 GiB each + 0.5 headroom: three fit, the fourth would leave 20 < 20.5.
    assert len(ok) == 3
    os.environ["SAGELLM_HOME"] = home
    try:
        state = StateStore().read()
    finally:
        os.environ.pop("SAGELLM_HOME")
    assert sorted(state.reservations) == sorted(ok)
    assert sum(r.gib_per_gpu for r in state.reservations.values()) <= 80


# --------------------------------------------------------------------------- fake NVML


class FakeNVMLError(Exception):
    pass


def fake_pynvml(*, init_error: str | None = None, gpus: int = 2, nvlink: bool = True):
    """A stand-in for pynvml: GPU 1 has no power reading, no NVLink support on GPU 1."""
    m = types.ModuleType("pynvml")
    m.NVMLError = FakeNVMLError
    m.NVML_TEMPERATURE_GPU = 0
    m.NVML_NVLINK_MAX_LINKS = 4
    m.NVML_P2P_CAPS_INDEX_NVLINK = 2
    m.NVML_P2P_STATUS_OK = 0
    m.nvmlMemory_v2 = 0x02000028

    def init():
        if init_error:
            raise FakeNVMLError(init_error)

    def memory(h, version=None):
        total, used, reserved = 80 * GIB, (10 + h) * GIB, GIB // 2
        free = total - used - reserved
        if version:
            return types.SimpleNamespace(total=total, used=used, free=free, reserved=reserved)
        return types.SimpleNamespace(total=total, used=used + reserved, free=free)

    def power(h):
        if h == 1:
            raise FakeNVMLError("Not Supported")
        return 123456

    def link_state(h, link):
        if h == 1 or not nvlink:
            raise FakeNVMLError("Not Supported")
        return 1

    def procs(h):
        return [types.SimpleNamespace(pid=4242, usedGpuMemory=3 * GIB)] if h == 0 else []

    m.nvmlInit = init
    m.nvmlShutdown = lambda: None
    m.nvmlDeviceGetCount = lambda: gpus
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetMemoryInfo = memory
    m.nvmlDeviceGetName = lambda h: b"NVIDIA Fake"
    m.nvmlDeviceGetUUID = lambda h: f"GPU-fake-{h}"
    m.nvmlDeviceGetPciInfo = lambda h: types.SimpleNamespace(busId=f"00000000:0{h}:00.0".encode())
    m.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=7, memory=3)
    m.nvmlDeviceGetPowerUsage = power
    m.nvmlDeviceGetEnforcedPowerLimit = lambda h: 700000
    m.nvmlDeviceGetTemperature = lambda h, s: 41
    m.nvmlDeviceGetNvLinkState = link_state
    m.nvmlDeviceGetComputeRunningProcesses = procs
    m.nvmlDeviceGetGraphicsRunningProcesses = procs
    m.nvmlSystemGetProcessName = lambda pid: b"/usr/bin/python3"
    m.nvmlDeviceGetP2PStatus = lambda a, b, i: 0 if nvlink else 1
    m.nvmlDeviceGetTopologyCommonAncestor = lambda a, b: 30
    m.nvmlSystemGetDriverVersion = lambda: b"580.1"
    m.nvmlSystemGetCudaDriverVersion_v2 = lambda: 13000
    return m


def test_nvml_reading_is_tolerant_per_field(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    inventory = nvml_inventory({4242: "e7"})
    assert inventory.nvml and inventory.available and not inventory.mock
    assert (inventory.driver_version, inventory.cuda_version) == ("580.1", "13.0")
    g0, g1 = inventory.gpus
    assert (g0.memory_total_mib, g0.memory_used_mib, g0.memory_driver_reserved_mib) == (
        81920,
        10240,
        512,
    )
    assert g0.power_w == 123.5 and g1.power_w is None
    assert g0.nvlink_active_links == 4 and g1.nvlink_active_links is None
    assert g0.processes[0].engine_id == "e7" and g0.processes[0].used_mib == 3072
    assert inventory.nvlink_pairs == {frozenset((0, 1))}
    assert inventory.topology[0][1] == "NV"  # GPU 1 reports no link count
    # Planning counts the driver's reserve as used: 80 - 10.5 GiB.
    assert capacities(inventory, [])[0].free_gib == pytest.approx(69.5)


def test_nvml_topology_without_nvlink(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(nvlink=False))
    inventory = nvml_inventory()
    assert inventory.topology == [["X", "PHB"], ["PHB", "X"]]
    assert inventory.nvlink_pairs == set()


def test_nvml_init_failure_is_a_reason_not_an_error(monkeypatch):
    monkeypatch.setitem(
        sys.modules, "pynvml", fake_pynvml(init_error="NVML Shared Library Not Found")
    )
    inventory = nvml_inventory()
    assert not inventory.nvml and inventory.gpus == []
    assert "no NVIDIA driver" in inventory.reason
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(init_error="Driver Not Loaded"))
    assert nvml_inventory().reason == "NVIDIA driver not loaded"


# --------------------------------------------------------------------------- attribution


def test_engine_pid_map_covers_the_process_group_and_setsid_children():
    script = "sleep 60 & setsid sleep 61 & wait"
    import psutil

    proc = subprocess.Popen(["/bin/sh", "-c", script], start_new_session=True)
    children: set[int] = set()
    try:
        deadline = time.monotonic() + 5
        while len(psutil.Process(proc.pid).children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        children = {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        record = EngineRecord(
            id="e1", kind="llm", runtime="vllm", model="m", served_model_name="m",
            host="127.0.0.1", port=1, status="ready", pid=proc.pid, pgid=proc.pid,
            pid_create_time=psutil.Process(proc.pid).create_time(),
        )  # fmt: skip
        dead = EngineRecord(
            id="e2", kind="llm", runtime="vllm", model="m", served_model_name="m",
            host="127.0.0.1", port=2, status="stopped", pid=os.getpid(), pgid=os.getpgid(0),
        )  # fmt: skip
        state = State(engines={"e1": record, "e2": dead})
        mapping = engine_pid_map(state)
        assert mapping[proc.pid] == "e1"
        assert children and all(mapping.get(c) == "e1" for c in children)
        assert os.getpid() not in mapping  # stopped engines are not attributed
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in children:  # the setsid child left the group
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(10)


# --------------------------------------------------------------------------- CLI


def test_cli_without_nvml_says_so_and_exits_0(tmp_path):
    home = tmp_path / "home"
    env = {"SAGELLM_DISABLE_NVML": "1"}
    out = sage("llm", "gpu", "--json", home=home, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "nvml": False,
        "reason": "NVML disabled by SAGELLM_DISABLE_NVML=1",
        "gpus": [],
    }
    text = sage("llm", "gpu", home=home, env=env)
    assert text.returncode == 0
    assert text.stdout.strip() == "no NVML: NVML disabled by SAGELLM_DISABLE_NVML=1"


def test_cli_mock_gpus_are_labelled_everywhere(tmp_path):
    home = tmp_path / "home"
    env = {"SAGELLM_MOCK_GPUS": "2x80", "SAGELLM_MOCK_NVLINK": "0,1", "COLUMNS": "200"}
    with StateStore(home / "state.json").transaction() as state:
        state.reservations["e1"] = GpuReservation("e1", [1], 30.0, mock=True)
    data = json.loads(sage("llm", "gpu", "--json", home=home, env=env).stdout)
    assert data["mock"] is True and all(g["mock"] for g in data["gpus"])
    assert [g["sagellm_reserved_gib"] for g in data["gpus"]] == [0.0, 30.0]
    assert [g["plan_free_gib"] for g in data["gpus"]] == [80.0, 50.0]
    assert data["nvlink_pairs"] == [[0, 1]]
    assert data["reservations"][0]["engine_id"] == "e1"
    text = sage("llm", "gpu", home=home, env=env).stdout
    assert "(mock)" in text and "0 (mock)" in text and "1 (mock)" in text


def test_cli_watch_refreshes(tmp_path):
    env = {
        **os.environ,
        "SAGELLM_HOME": str(tmp_path / "home"),
        "SAGELLM_MOCK_GPUS": "1x24",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "sagellm_cli", "llm", "gpu", "--json", "--watch", "0.2"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        lines = [json.loads(proc.stdout.readline()) for _ in range(3)]
        assert all(line["gpus"][0]["memory_total_mib"] == 24576 for line in lines)
    finally:
        proc.terminate()
        proc.wait(10)


def test_cli_watch_without_seconds_is_accepted(tmp_path):
    from typer.testing import CliRunner

    from sagellm_cli.cli import gpu as gpu_cli

    calls = []
    orig = gpu_cli._watch
    gpu_cli._watch = lambda json_out, seconds: calls.append((json_out, seconds))
    try:
        result = CliRunner().invoke(gpu_cli.app, ["--watch", "--json"])
        assert result.exit_code == 0, result.output
        result = CliRunner().invoke(gpu_cli.app, ["--watch", "5"])
        assert result.exit_code == 0, result.output
    finally:
        gpu_cli._watch = orig
    assert calls == [(True, 2.0), (False, 5.0)]


def test_cli_plan_recommends_and_checks(tmp_path):
    home = tmp_path / "home"
    env = {"SAGELLM_MOCK_GPUS": "2x80"}
    small = json.loads(
        sage("llm", "gpu", "plan", "Qwen/Qwen2.5-7B-Instruct", "--json", home=home, env=env).stdout
    )
    assert small["recommendation"].startswith("under 10B")
    assert small["fits"] is True
    assert (small["recommended"]["tensor_parallel"], small["recommended"]["gpus"]) == (1, [0])
    big = json.loads(
        sage("llm", "gpu", "plan", "meta-llama/Llama-3.1-70B", "--json", home=home, env=env).stdout
    )
    assert big["recommended"]["tensor_parallel"] == 4
    assert big["fits"] is False
    assert big["recommended"]["problem"] == "needs 4 GPUs, 2 present"
    two = json.loads(
        sage("llm", "gpu", "plan", "org/m-13B", "--gpus", "2", "--json", home=home, env=env).stdout
    )
    assert [(x["tensor_parallel"], x["fits_now"]) for x in two["layouts"]] == [(2, True)]
    unknown = sage("llm", "gpu", "plan", "acme/mystery", "--json", home=home,
                   env={**env, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert unknown.returncode == 0, unknown.stderr
    layout = json.loads(unknown.stdout)["recommended"]
    assert "conservative" in layout["estimate"]["notes"][0]


def test_engine_start_that_cannot_fit_exits_4_before_spawning(tmp_path):
    home = tmp_path / "home"
    env = {"SAGELLM_MOCK_GPUS": "1x80"}
    out = sage(
        "llm", "engine", "start", "org/huge-7B", "--gpu-memory-gb", "100", home=home, env=env,
        timeout=60,
    )  # fmt: skip
    assert out.returncode == 4, out.stderr
    assert "not enough GPU memory" in out.stderr and "GPU 0 (mock)" in out.stderr
    state = StateStore(home / "state.json").read()
    assert not state.reservations
    assert not any(r.pid for r in state.engines.values())


def test_serial_mode_loads_one_engine_at_a_time_per_gpu(home, monkeypatch):
    """SAGELLM_GPU_START_MODE=serial: a second engine on the same GPU is queued until the
    first is no longer loading; other GPUs and mock GPUs load in parallel."""
    from sagellm_cli.core.engines.manager import _loading_before, _must_queue
    from sagellm_cli.core.records import EngineRecord

    def rec(i, status, gpus, created):
        return EngineRecord(id=f"e{i}", kind="llm", runtime="vllm", model="m",
                            served_model_name="m", host="127.0.0.1", port=9000 + i,
                            status=status, gpus=gpus, created_at=created)  # fmt: skip

    monkeypatch.setenv("SAGELLM_GPU_START_MODE", "serial")
    spec = EngineSpec(model="m")
    state = State()
    state.engines["e1"] = rec(1, "starting", [0], 1.0)
    real = Placement(gpus=[0], uuids=["GPU-a"], gib_per_gpu=8.0, total_gib=[80.0])
    other = Placement(gpus=[1], uuids=["GPU-b"], gib_per_gpu=8.0, total_gib=[80.0])
    mock = Placement(gpus=[0], uuids=["GPU-mock-0"], gib_per_gpu=8.0, total_gib=[80.0], mock=True)
    assert _must_queue(state, spec, "vllm", real, None)
    assert not _must_queue(state, spec, "vllm", other, None)  # another GPU loads in parallel
    assert not _must_queue(state, spec, "vllm", mock, None)  # mock engines run on the CPU
    # The queue is first come, first served; a ready neighbour blocks nobody.
    state.engines["e2"] = rec(2, "queued", [0], 2.0)
    state.engines["e3"] = rec(3, "queued", [0], 3.0)
    assert _loading_before(state, state.engines["e2"]) and _loading_before(
        state, state.engines["e3"]
    )
    state.engines["e1"].status = "ready"
    assert not _loading_before(state, state.engines["e2"])
    assert _loading_before(state, state.engines["e3"])
