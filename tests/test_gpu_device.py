"""On a real NVIDIA GPU: inventory vs nvidia-smi, embedding engines placed and attributed,
two engines sharing one GPU, stop freeing memory, and the vLLM command line.

Skipped unless NVML sees a GPU. Run on the GPU machine with scripts/gpu_device_run.sh.
The embedding model is a tiny random BERT built on the spot (no download, no
carried weights); set SAGELLM_TEST_EMBED_MODEL to a local folder to use another.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import sage, sage_json, stop_all_engines

from sagellm_cli.core.state import StateStore


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
]
# conftest disables NVML for the CPU suite; these tests need the real thing.
GPU_ENV = {"SAGELLM_DISABLE_NVML": "0", "SAGELLM_MOCK_GPUS": "", "HF_HUB_OFFLINE": "1"}
MIB = 1024**2


# --------------------------------------------------------------------------- helpers


def nvml_snapshot() -> dict[int, dict]:
    """Straight from pynvml (not through our code): uuid, used MiB, {pid: MiB} per GPU."""
    import pynvml

    pynvml.nvmlInit()
    try:
        out = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            procs = {
                p.pid: (p.usedGpuMemory or 0) // MIB
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)
            }
            uuid = pynvml.nvmlDeviceGetUUID(h)
            out[i] = {
                "uuid": uuid.decode() if isinstance(uuid, bytes) else uuid,
                "occupied_mib": (mem.total - mem.free) // MIB,
                "procs": procs,
            }
        return out
    finally:
        pynvml.nvmlShutdown()


def engine_pids(record: dict) -> set[int]:
    import psutil

    pids: set[int] = set()
    for proc in psutil.process_iter(["pid"]):
        try:
            if record.get("pgid") and os.getpgid(proc.pid) == record["pgid"]:
                pids.add(proc.pid)
        except OSError:
            continue
    for root in list(pids) + [record["pid"]]:
        try:
            pids.add(root)
            pids.update(c.pid for c in psutil.Process(root).children(recursive=True))
        except psutil.Error:
            continue
    return pids


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def build_tiny_bert(dest: Path) -> Path:
    """A random 2-layer BERT with a WordPiece tokenizer, loadable by sentence-transformers."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    dest.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    words = [
        "the",
        "a",
        "of",
        "and",
        "to",
        "in",
        "is",
        "it",
        "that",
        "gpu",
        "memory",
        "engine",
        "model",
        "test",
        "hello",
        "world",
    ]
    tokens = dict.fromkeys(specials + words + chars + ["##" + c for c in chars])
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece()
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    ).save_pretrained(str(dest))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(str(dest))
    return dest


@pytest.fixture(scope="module")
def embed_model(tmp_path_factory) -> str:
    given = os.environ.get("SAGELLM_TEST_EMBED_MODEL")
    if given:
        return given
    return str(build_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert"))


@pytest.fixture(scope="module")
def gpu_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("gpu") / "sagellm"
    yield home
    stop_all_engines(home)


ENGINES: dict[str, dict] = {}


def start_embedding(home: Path, model: str, label: str, *extra: str) -> dict:
    record = sage_json(
        "llm", "engine", "start", model, "--engine-kind", "embedding", "--use-gpu",
        "--label", label, *extra, home=home, env=GPU_ENV, timeout=600,
    )  # fmt: skip
    ENGINES[label] = record
    return record


def ledger(home: Path):
    return StateStore(home / "state.json").read().reservations


# --------------------------------------------------------------------------- tests


def test_inventory_matches_nvidia_smi(gpu_home):
    smi = shutil.which("nvidia-smi")
    if smi is None:
        pytest.skip("nvidia-smi is not on PATH")
    query = "--query-gpu=index,uuid,memory.total,memory.used"
    rows = subprocess.run(
        [smi, query, "--format=csv,noheader,nounits"], capture_output=True, text=True, check=True
    ).stdout
    ours = sage_json("llm", "gpu", home=gpu_home, env=GPU_ENV)
    human = sage("llm", "gpu", home=gpu_home, env={**GPU_ENV, "COLUMNS": "160"})
    print("\n$ nvidia-smi " + query + "\n" + rows.strip())
    print("$ sage llm gpu\n" + human.stdout)
    assert ours["nvml"] is True and ours["mock"] is False
    assert ours["driver_version"] and ours["cuda_version"]
    smi_rows = [[c.strip() for c in line.split(",")] for line in rows.strip().splitlines()]
    assert len(smi_rows) == len(ours["gpus"]) == GPU_COUNT
    for (index, uuid, total, used), gpu in zip(smi_rows, ours["gpus"], strict=True):
        assert gpu["index"] == int(index)
        assert gpu["uuid"] == uuid
        assert gpu["mock"] is False
        assert gpu["memory_total_mib"] == int(total)
        drift = abs(gpu["memory_used_mib"] - int(used))
        with_reserve = gpu["memory_used_mib"] + gpu["memory_driver_reserved_mib"]
        assert drift <= 64, (
            f"GPU {index}: used {gpu['memory_used_mib']} MiB vs nvidia-smi {used} MiB "
            f"(used + driver reserve = {with_reserve})"
        )
        assert gpu["plan_free_gib"] <= gpu["memory_total_mib"] / 1024


def test_embedding_engine_is_placed_attributed_and_reserved(gpu_home, embed_model):
    import httpx

    record = start_embedding(gpu_home, embed_model, "gpu-a")
    assert record["status"] == "ready" and record["gpus"], record
    gpu = record["gpus"][0]
    reservation = ledger(gpu_home)[record["id"]]
    assert reservation.gpus == record["gpus"] and not reservation.mock
    assert reservation.gib_per_gpu > 0
    print(f"\nengine {record['id']} on GPU {gpu}, reserved {reservation.gib_per_gpu} GiB")

    # The engine sees only its GPU, named by UUID.
    env = Path(f"/proc/{record['pid']}/environ").read_bytes().split(b"\0")
    env = dict(e.decode().split("=", 1) for e in env if b"=" in e)
    real = nvml_snapshot()
    assert env.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID"
    assert env.get("CUDA_VISIBLE_DEVICES") == real[gpu]["uuid"]

    resp = httpx.post(
        record["url"] + "/v1/embeddings",
        json={"model": record["served_model_name"], "input": ["hello gpu", "memory test"]},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["data"]) == 2

    pids = engine_pids(record)
    on_gpu = wait_for(
        lambda: set(nvml_snapshot()[gpu]["procs"]) & pids, 60, "the engine in NVML's process list"
    )
    snap = sage_json("llm", "gpu", home=gpu_home, env=GPU_ENV)
    entry = snap["gpus"][gpu]
    mapped = [p for p in entry["processes"] if p["pid"] in on_gpu]
    assert mapped and all(p["engine_id"] == record["id"] for p in mapped), entry["processes"]
    assert entry["sagellm_reserved_gib"] == pytest.approx(reservation.gib_per_gpu, abs=1e-3)
    used = sum(p["used_mib"] or 0 for p in entry["processes"] if p["engine_id"] == record["id"])
    print(f"NVML: pids {sorted(on_gpu)} use {used} MiB on GPU {gpu}, mapped to {record['id']}")
    # Counted once: planning free = total - other use - max(reserved, used).
    other = entry["memory_total_mib"] - entry["memory_free_mib"] - used
    expected = (
        entry["memory_total_mib"] / 1024 - other / 1024 - max(reservation.gib_per_gpu, used / 1024)
    )
    assert entry["plan_free_gib"] == pytest.approx(expected, abs=0.05)


def test_two_engines_share_one_gpu_with_their_shares(gpu_home, embed_model):
    if "gpu-a" not in ENGINES:
        pytest.skip("the first engine did not start")
    first = ENGINES["gpu-a"]
    b = start_embedding(gpu_home, embed_model, "gpu-b", "--gpu-memory-gb", "3")
    c = start_embedding(gpu_home, embed_model, "gpu-c", "--gpu-memory-gb", "5")
    # Best fit packs both onto the GPU that already holds an engine.
    assert b["gpus"] == c["gpus"] == first["gpus"], (b["gpus"], c["gpus"], first["gpus"])
    gpu = b["gpus"][0]
    book = ledger(gpu_home)
    assert (book[b["id"]].gib_per_gpu, book[c["id"]].gib_per_gpu) == (3.0, 5.0)
    wait_for(
        lambda: (
            {b["id"], c["id"]}
            <= {
                p["engine_id"]
                for p in sage_json("llm", "gpu", home=gpu_home, env=GPU_ENV)["gpus"][gpu][
                    "processes"
                ]
            }
        ),
        60,
        "both engines in NVML's process list",
    )
    snap = sage_json("llm", "gpu", home=gpu_home, env=GPU_ENV)
    entry = snap["gpus"][gpu]
    total_reserved = sum(r.gib_per_gpu for r in book.values() if gpu in r.gpus)
    assert entry["sagellm_reserved_gib"] == pytest.approx(total_reserved, abs=1e-3)
    assert entry["reservations"][b["id"]] == 3.0 and entry["reservations"][c["id"]] == 5.0
    for rec, share in ((b, 3.0), (c, 5.0)):
        used = sum(p["used_mib"] or 0 for p in entry["processes"] if p["engine_id"] == rec["id"])
        print(f"engine {rec['id']}: reserved {share} GiB, NVML {used} MiB")
        assert 0 < used <= share * 1024
    print(sage("llm", "gpu", home=gpu_home, env={**GPU_ENV, "COLUMNS": "160"}).stdout)


def test_stop_frees_gpu_memory_and_reservation(gpu_home):
    if not ENGINES:
        pytest.skip("no engine started")
    for label, record in list(ENGINES.items()):
        gpu = record["gpus"][0]
        pids = engine_pids(record)
        before = nvml_snapshot()[gpu]
        held = sum(before["procs"].get(p, 0) for p in pids)
        out = sage("llm", "engine", "stop", record["id"], home=gpu_home, env=GPU_ENV, timeout=120)
        assert out.returncode == 0, out.stderr
        assert record["id"] not in ledger(gpu_home)
        after = wait_for(
            lambda gpu=gpu, pids=pids: (
                s if not (set((s := nvml_snapshot()[gpu])["procs"]) & pids) else None
            ),
            30,
            f"engine {label}'s processes to leave the GPU",
        )
        freed = before["occupied_mib"] - after["occupied_mib"]
        print(f"stopped {record['id']}: held {held} MiB, GPU occupied fell by {freed} MiB")
        assert freed >= 0.8 * held
        del ENGINES[label]
    assert not ledger(gpu_home)


def test_vllm_command_line_carries_the_placement(gpu_home, tmp_path, monkeypatch):
    from sagellm_cli.core.errors import ResourceUnavailable
    from sagellm_cli.core.gpu import plan_gpu
    from sagellm_cli.core.records import EngineSpec
    from sagellm_cli.core.runtimes import build_launch

    for key, value in GPU_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SAGELLM_HOME", str(gpu_home))
    state = StateStore().read()
    real = nvml_snapshot()

    def launch(spec):
        placement = plan_gpu(spec, state)
        built = build_launch(
            spec, runtime="vllm", port=8000, served_model_name="m", placement=placement,
            scratch_dir=tmp_path, cache_dir=tmp_path,
        )  # fmt: skip
        return placement, built

    def flag(argv, name):
        return argv[argv.index(name) + 1]

    spec = EngineSpec(model="Qwen/Qwen2.5-7B-Instruct", kind="llm", gpu_memory_gb=20.0)
    placement, built = launch(spec)
    total_gib = placement.total_gib[0]
    expected = int(20.0 / total_gib * 1000) / 1000
    print(f"\n{' '.join(built.argv)}\nenv: {json.dumps(built.env)}")
    assert flag(built.argv, "--gpu-memory-utilization") == f"{expected:.3f}"
    assert flag(built.argv, "--tensor-parallel-size") == "1"
    assert built.env["CUDA_VISIBLE_DEVICES"] == real[placement.gpus[0]]["uuid"]
    assert built.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"

    estimated, built = launch(EngineSpec(model="Qwen/Qwen2.5-7B-Instruct", kind="llm"))
    share = estimated.gib_per_gpu / estimated.total_gib[0]
    assert float(flag(built.argv, "--gpu-memory-utilization")) == pytest.approx(share, abs=0.001)

    tp2 = EngineSpec(model="Qwen/Qwen2.5-7B-Instruct", kind="llm", tensor_parallel=2)
    if GPU_COUNT >= 2:
        placement, built = launch(tp2)
        assert flag(built.argv, "--tensor-parallel-size") == "2"
        uuids = [real[i]["uuid"] for i in placement.gpus]
        assert built.env["CUDA_VISIBLE_DEVICES"] == ",".join(uuids)
    else:
        with pytest.raises(ResourceUnavailable, match="needs 2 GPUs but 1 GPU is present") as err:
            launch(tp2)
        assert err.value.exit_code == 4
