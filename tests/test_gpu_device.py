"""On real NVIDIA GPUs with real vLLM: memory per engine against its reservation, no GPU
memory outliving a killed engine, tensor parallel over two GPUs, and the inventory.

Skipped unless NVML sees a GPU and vLLM is importable. Run on the GPU machine with
scripts/gpu_device_run.sh, which installs vLLM and prints the tables pasted in docs/gpu.md.
Every test starts and stops its own engines (no shared state between tests).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import time

import httpx
import pytest
from conftest import sage, sage_json, stop_all_engines


def _nvml_gpu_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - any failure means no usable GPU here
        return 0


GPU_COUNT = _nvml_gpu_count()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(GPU_COUNT == 0, reason="no NVIDIA GPU visible to NVML"),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]
# conftest disables NVML for the CPU suite; these tests need the real thing.
GPU_ENV = {"SAGELLM_DISABLE_NVML": "0", "SAGELLM_MOCK_GPUS": "", "HF_HUB_OFFLINE": "1"}
MIB = 1024**2
# Small CUDA-graph set: the tiny model starts faster, the accounting is the same.
TINY_ARGS = ["--max-model-len", "512", "--extra-arg=--max-num-seqs", "--extra-arg=32"]


def nvml_by_pid() -> dict[int, dict[int, int]]:
    """Straight from pynvml (not through our code): {gpu index: {pid: MiB}}."""
    import pynvml

    pynvml.nvmlInit()
    try:
        out = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            out[i] = {
                p.pid: (p.usedGpuMemory or 0) // MIB
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)
            }
        return out
    finally:
        pynvml.nvmlShutdown()


def group_pids(record: dict) -> set[int]:
    """Every live process of the engine: its process group and their descendants."""
    import psutil

    pids = set()
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == record["pgid"]:
                pids.add(proc.pid)
                pids.update(c.pid for c in proc.children(recursive=True))
        except (OSError, psutil.Error):
            continue
    alive = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
        except psutil.Error:
            continue
    return alive


def engine_gib(record: dict, gpu: int, pids: set[int] | None = None) -> float:
    """NVML's per-process memory of the engine on one GPU, in GiB."""
    pids = pids if pids is not None else group_pids(record)
    return sum(mib for pid, mib in nvml_by_pid()[gpu].items() if pid in pids) / 1024


def chat_ok(record: dict) -> bool:
    r = httpx.post(
        record["url"] + "/v1/chat/completions",
        json={"model": record["served_model_name"], "max_tokens": 4,
              "messages": [{"role": "user", "content": "hello"}]},
        timeout=120,
    )  # fmt: skip
    return r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


@pytest.fixture(scope="module")
def gpu_model(tiny_model) -> str:
    return str(tiny_model)


@pytest.fixture
def gpu_home(tmp_path_factory):
    # vLLM's own compile cache (~/.cache/vllm) is shared: later engines start warm.
    home = tmp_path_factory.mktemp("gpu") / "sagellm"
    yield home
    stop_all_engines(home)


def within_reservation(used: float, reserved: float) -> bool:
    """The promise: never above the reservation, below it by at most max(5 %, 0.5 GiB)."""
    return reserved - max(0.05 * reserved, 0.5) <= used <= reserved


# --------------------------------------------------------------------------- tests


def test_inventory_matches_nvidia_smi(gpu_home):
    smi = shutil.which("nvidia-smi")
    if smi is None:
        pytest.skip("nvidia-smi is not on PATH")
    query = "--query-gpu=index,uuid,memory.total"
    rows = subprocess.run(
        [smi, query, "--format=csv,noheader,nounits"], capture_output=True, text=True, check=True
    ).stdout
    ours = sage_json("llm", "gpu", home=gpu_home, env=GPU_ENV)
    assert ours["nvml"] is True and ours["mock"] is False
    smi_rows = [[c.strip() for c in line.split(",")] for line in rows.strip().splitlines()]
    assert len(smi_rows) == len(ours["gpus"]) == GPU_COUNT
    for (index, uuid, total), gpu in zip(smi_rows, ours["gpus"], strict=True):
        assert (gpu["index"], gpu["uuid"], gpu["memory_total_mib"]) == (
            int(index),
            uuid,
            int(total),
        )


def test_three_engines_started_together_on_one_gpu_get_what_they_reserved(gpu_home, gpu_model):
    """One preset apply, three chat engines on GPU 0 at once: each engine's NVML memory
    must match its reservation, whatever its neighbours do while it loads."""
    sizes = {"a": 6.0, "b": 10.0, "c": 14.0}
    engines = "".join(
        f"  - name: {name}\n    kind: llm\n    model: {gpu_model}\n    served_model_name: t{name}\n"
        f"    gpus: [0]\n    gpu_memory_gb: {gib}\n    max_model_len: 512\n"
        f"    extra_args: [--max-num-seqs, '32']\n"
        for name, gib in sizes.items()
    )
    preset = gpu_home.parent / "three.yaml"
    preset.write_text(f"version: 1\nname: three\nengines:\n{engines}")
    began = time.monotonic()
    result = sage_json("llm", "preset", "apply", "--file", str(preset), home=gpu_home,
                       env=GPU_ENV, timeout=1200)  # fmt: skip
    took = time.monotonic() - began
    records = {r["label"].rsplit("-", 1)[-1]: r for r in result["started"]}
    rows = []
    for name, record in sorted(records.items()):
        used = engine_gib(record, 0)
        rows.append((record["id"], name, sizes[name], used))
        assert chat_ok(record)
    print(f"\npreset apply of 3 engines on GPU 0: up in {took:.0f}s (serial starts per GPU)")
    print("engine    reserved GiB  NVML used GiB  difference")
    for engine_id, _name, reserved, used in rows:
        print(f"{engine_id}  {reserved:12.2f}  {used:13.2f}  {used - reserved:+10.2f}")
    print(sage("llm", "gpu", home=gpu_home, env={**GPU_ENV, "COLUMNS": "160"}).stdout)
    shown = sage_json("llm", "gpu", home=gpu_home, env=GPU_ENV)["reservations"]
    assert not any(r["over"] for r in shown)
    for _, name, reserved, used in rows:
        assert within_reservation(used, reserved), (name, reserved, used)
    sage("llm", "preset", "down", "three", home=gpu_home, env=GPU_ENV, timeout=300)
    for record in records.values():
        assert not group_pids(record)


def test_kill_9_of_the_api_server_frees_the_gpu_after_the_next_reconcile(gpu_home, gpu_model):
    record = sage_json(
        "llm", "engine", "start", gpu_model, "--gpu-memory-gb", "8", *TINY_ARGS,
        "--extra-arg=--enforce-eager", home=gpu_home, env=GPU_ENV, timeout=900,
    )  # fmt: skip
    pids = group_pids(record)
    assert len(pids) > 1, "expected vLLM's EngineCore beside the API server"
    held = engine_gib(record, record["gpus"][0], pids)
    os.kill(record["pid"], signal.SIGKILL)
    time.sleep(2)
    # Nobody has looked yet: the engine core still holds the memory, the ledger keeps it.
    orphaned = engine_gib(record, record["gpus"][0], pids)
    reserved = json.loads((gpu_home / "state.json").read_text())["reservations"]
    assert record["id"] in reserved
    began = time.monotonic()
    listed = sage_json("llm", "engine", "list", "--all", home=gpu_home, env=GPU_ENV)
    reaped_in = time.monotonic() - began
    print(f"\nkill -9 of the API server: engine held {held:.2f} GiB, its core still "
          f"{orphaned:.2f} GiB two seconds later; one `engine list` reaped it in {reaped_in:.1f}s")  # fmt: skip
    assert [(r["status"], r["orphans"]) for r in listed] == [("failed", False)]
    assert reaped_in < 10
    assert not group_pids(record)
    assert engine_gib(record, record["gpus"][0], pids) == 0
    assert json.loads((gpu_home / "state.json").read_text())["reservations"] == {}


@pytest.mark.skipif(GPU_COUNT < 2, reason="needs two GPUs")
def test_tensor_parallel_2_spans_both_gpus_and_stop_frees_them(gpu_home, gpu_model):
    record = sage_json(
        "llm", "engine", "start", gpu_model, "--tensor-parallel", "2", "--gpu-memory-gb", "10",
        *TINY_ARGS, "--extra-arg=--enforce-eager", home=gpu_home, env=GPU_ENV, timeout=900,
    )  # fmt: skip
    assert sorted(record["gpus"]) == [0, 1]
    assert "--tensor-parallel-size" in record["command"]
    mapped = {
        g["index"]: {p["engine_id"] for p in g["processes"]}
        for g in sage_json("llm", "gpu", home=gpu_home, env=GPU_ENV)["gpus"]
    }
    assert record["id"] in mapped[0] and record["id"] in mapped[1]
    used = [engine_gib(record, i) for i in (0, 1)]
    print(f"\nTP 2 engine {record['id']}: NVML {used[0]:.2f} + {used[1]:.2f} GiB, "
          f"reserved 10 GiB on each")  # fmt: skip
    print(sage("llm", "engine", "list", home=gpu_home, env={**GPU_ENV, "COLUMNS": "160"}).stdout)
    assert all(within_reservation(u, 10.0) for u in used), used
    assert chat_ok(record)
    pids = group_pids(record)
    sage("llm", "engine", "stop", record["id"], home=gpu_home, env=GPU_ENV, timeout=300)
    assert not group_pids(record)
    assert all(engine_gib(record, i, pids) == 0 for i in (0, 1))


@pytest.mark.skipif(GPU_COUNT < 2, reason="needs two GPUs")
def test_preset_with_a_tp2_and_a_tp1_engine(gpu_home, gpu_model):
    preset = gpu_home.parent / "mixed.yaml"
    preset.write_text(
        "version: 1\nname: mixed\nengines:\n"
        f"  - name: wide\n    kind: llm\n    model: {gpu_model}\n    tensor_parallel: 2\n"
        "    gpu_memory_gb: 6\n    max_model_len: 512\n"
        "    extra_args: [--enforce-eager, --max-num-seqs, '32']\n"
        f"  - name: narrow\n    kind: llm\n    model: {gpu_model}\n    gpu_memory_gb: 4\n"
        "    max_model_len: 512\n    extra_args: [--enforce-eager, --max-num-seqs, '32']\n"
    )
    result = sage_json("llm", "preset", "apply", "--file", str(preset), home=gpu_home,
                       env=GPU_ENV, timeout=1200)  # fmt: skip
    by_name = {r["label"]: r for r in result["started"]}
    assert (
        sorted(by_name["mixed-wide"]["gpus"]) == [0, 1]
        and len(by_name["mixed-narrow"]["gpus"]) == 1
    )
    print("\n" + sage("llm", "gpu", home=gpu_home, env={**GPU_ENV, "COLUMNS": "160"}).stdout)
    shown = sage_json("llm", "gpu", home=gpu_home, env=GPU_ENV)["reservations"]
    assert not any(r["over"] for r in shown), shown
    assert all(chat_ok(r) for r in by_name.values())
    sage("llm", "preset", "down", "mixed", home=gpu_home, env=GPU_ENV, timeout=300)
    assert not any(group_pids(r) for r in by_name.values())
