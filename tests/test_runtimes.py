"""Command lines built for each runtime (pure: nothing is started)."""

from __future__ import annotations

import json

import pytest

from sagellm_cli.core.errors import BadInput
from sagellm_cli.core.gpu import Placement
from sagellm_cli.core.launchers.runtimes import build_launch
from sagellm_cli.core.records import EngineSpec, resolve_runtime


def _build(spec, placement=None, runtime=None, tmp_path=None):
    return build_launch(
        spec,
        runtime=runtime or resolve_runtime(spec.kind, spec.runtime),
        port=18000,
        served_model_name="served",
        placement=placement,
        scratch_dir=tmp_path / "scratch",
        cache_dir=tmp_path / "cache",
    )


def _flag(argv, name):
    return argv[argv.index(name) + 1]


def test_cpu_llm_gets_memory_safe_defaults(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 1024}))
    launch = _build(EngineSpec(model=str(model), extra_args=["--seed", "3"]), tmp_path=tmp_path)
    argv = launch.argv
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert "--enforce-eager" in argv
    assert _flag(argv, "--kv-cache-memory-bytes") == str(1024**3)
    assert _flag(argv, "--distributed-executor-backend") == "uni"
    assert _flag(argv, "--max-model-len") == "1024"  # capped by the model's own limit
    assert argv[-2:] == ["--seed", "3"]  # user's extra args last, verbatim
    assert launch.env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert launch.env["TMPDIR"] == str(tmp_path / "scratch")


def test_kv_cache_override_and_explicit_max_len(tmp_path):
    spec = EngineSpec(model="org/model", kv_cache_gb=0.0625, max_model_len=512)
    argv = _build(spec, tmp_path=tmp_path).argv
    assert _flag(argv, "--kv-cache-memory-bytes") == str(64 * 1024**2)
    assert _flag(argv, "--max-model-len") == "512"


def test_gpu_llm_carries_the_placement(tmp_path):
    placement = Placement(
        gpus=[2, 3], uuids=["GPU-a", "GPU-b"], gib_per_gpu=40.0, total_gib=[80.0, 80.0]
    )
    spec = EngineSpec(model="org/model", tensor_parallel=2)
    launch = _build(spec, placement, tmp_path=tmp_path)
    assert _flag(launch.argv, "--tensor-parallel-size") == "2"
    assert _flag(launch.argv, "--gpu-memory-utilization") == "0.480"  # (40 - 1.6) / 80
    assert "--enforce-eager" not in launch.argv
    assert launch.env["CUDA_VISIBLE_DEVICES"] == "GPU-a,GPU-b"
    assert launch.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_embedding_defaults_to_our_server_on_cpu(tmp_path):
    launch = _build(EngineSpec(model="all-MiniLM-L6-v2", kind="embedding"), tmp_path=tmp_path)
    assert launch.argv[1:3] == ["-m", "sagellm_cli.servers.embedding"]
    assert _flag(launch.argv, "--device") == "cpu"
    assert launch.env["CUDA_VISIBLE_DEVICES"] == ""


def test_embedding_on_gpu_is_capped_to_its_share(tmp_path):
    placement = Placement(gpus=[0], uuids=["GPU-a"], gib_per_gpu=8.0, total_gib=[80.0])
    launch = _build(
        EngineSpec(model="m", kind="embedding", use_gpu=True), placement, tmp_path=tmp_path
    )
    assert _flag(launch.argv, "--device") == "cuda"
    assert _flag(launch.argv, "--gpu-memory-fraction") == "0.092"  # (8 - 0.6) / 80


def test_vllm_pooling_runner_for_embeddings(tmp_path):
    spec = EngineSpec(model="m", kind="embedding", runtime="vllm")
    argv = _build(spec, tmp_path=tmp_path).argv
    assert _flag(argv, "--runner") == "pooling"
    assert "--kv-cache-memory-bytes" in argv  # vLLM CPU needs the bound for pooling too


def test_lora_flags_env_and_recorded_adapters(tmp_path):
    plain = _build(EngineSpec(model="m"), tmp_path=tmp_path)
    assert "--enable-lora" not in plain.argv and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in plain.env
    spec = EngineSpec(model="m", max_lora_rank=8, lora_adapters={"a": "/x/a", "b": "/x/b"})
    launch = _build(spec, tmp_path=tmp_path)
    argv = launch.argv
    assert "--enable-lora" in argv and _flag(argv, "--max-lora-rank") == "8"
    i = argv.index("--lora-modules")  # one flag, several values: vLLM keeps the last flag only
    assert argv[i + 1 : i + 3] == ["a=/x/a", "b=/x/b"]
    assert launch.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_lora_needs_an_llm_on_vllm():
    from sagellm_cli.core.engines.manager import validate_spec

    spec = EngineSpec(model="m", kind="embedding", enable_lora=True)
    with pytest.raises(BadInput, match="LoRA"):
        validate_spec(spec)


@pytest.mark.parametrize(("kind", "runtime"), [("llm", "sentence-transformers"), ("video", None)])
def test_bad_runtime_pairs(kind, runtime):
    with pytest.raises(BadInput):
        resolve_runtime(kind, runtime)


def test_cpu_engines_get_disjoint_cores(monkeypatch):
    from sagellm_cli.core.launchers.cpu_placement import pick_cores

    monkeypatch.delenv("SAGELLM_CPU_CORES_PER_ENGINE", raising=False)
    cores = [0, 1, 2, 3]
    first = pick_cores([], cores)
    second = pick_cores([first], cores)
    assert first == [0, 1] and second == [2, 3]
    assert pick_cores([first, second, [0]], cores) == [1, 2]  # least used next
    monkeypatch.setenv("SAGELLM_CPU_CORES_PER_ENGINE", "1")
    assert pick_cores([[0]], [0, 1]) == [1]


def test_cpu_cores_become_the_vllm_thread_binding(tmp_path):
    spec = EngineSpec(model="org/model")
    launch = build_launch(
        spec,
        runtime="vllm",
        port=1,
        served_model_name="m",
        placement=None,
        scratch_dir=tmp_path,
        cache_dir=tmp_path,
        cpu_cores=[2, 3],
    )
    assert launch.env["VLLM_CPU_OMP_THREADS_BIND"] == "2,3"
    assert launch.env["OMP_NUM_THREADS"] == "2"


@pytest.mark.parametrize("launcher", ["local", "ray"])
def test_kv_events_endpoint_follows_the_launcher(tmp_path, launcher):
    """A local engine's publisher connects to the gateway on loopback; a Ray node's binds:
    the launcher's own `on_this_machine` decides, the same property the gateway reads."""
    from sagellm_cli.core.launchers.base import launcher_for

    on_here = launcher_for("local" if launcher == "local" else "ray:10.0.0.2").on_this_machine
    launch = build_launch(EngineSpec(model="org/model"), runtime="vllm", port=1,
                          served_model_name="m", placement=None, scratch_dir=tmp_path,
                          cache_dir=tmp_path, kv_events_port=5599,
                          on_this_machine=on_here)  # fmt: skip
    config = json.loads(_flag(launch.argv, "--kv-events-config"))
    assert config["endpoint"] == ("tcp://127.0.0.1:5599" if on_here else "tcp://*:5599")
    assert on_here is (launcher == "local")


def test_a_model_path_is_checked_only_where_the_engine_runs(tmp_path):
    """A missing path is refused for an engine on this machine; one on a Ray node gets the
    name as written (the path is the node's, not ours)."""
    spec = EngineSpec(model="/models-on-the-node/qwen")
    common = {"runtime": "vllm", "port": 1, "served_model_name": "m", "placement": None,
              "scratch_dir": tmp_path, "cache_dir": tmp_path}  # fmt: skip
    with pytest.raises(BadInput, match="is a path that does not exist"):
        build_launch(spec, **common)
    launch = build_launch(spec, **common, on_this_machine=False)
    assert _flag(launch.argv, "--model") == "/models-on-the-node/qwen"


# --------------------------------------------------------------------------- CPU dtype


def _checkpoint(tmp_path, dtype):
    model = tmp_path / f"m-{dtype}"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"torch_dtype": dtype}))
    return str(model)


AVX2 = frozenset({"avx", "avx2"})
AVX512_BF16 = frozenset({"avx2", "avx512f", "avx512_bf16"})
AMX = AVX512_BF16 | {"amx_tile", "amx_bf16"}


@pytest.mark.skipif(__import__("os").uname().machine != "x86_64", reason="x86 rules")
@pytest.mark.parametrize(
    ("dtype", "flags", "amx_ok", "expected"),
    [
        ("float32", AMX, True, "float32"),  # never downcast a float32 checkpoint
        ("bfloat16", AMX, False, "float32"),  # AMX advertised, the kernel refuses it
        ("bfloat16", AMX, True, None),  # working AMX: vLLM's own bf16
        ("bfloat16", AVX512_BF16, None, None),  # native bf16 without AMX
        ("bfloat16", AVX2, None, "float32"),  # no native bf16: emulated, slower
    ],
)
def test_cpu_dtype_rules(tmp_path, dtype, flags, amx_ok, expected):
    from sagellm_cli.core.launchers import cpu_dtype

    choice = cpu_dtype.choose(_checkpoint(tmp_path, dtype), [], flags=flags, amx_ok=amx_ok)
    assert choice.dtype == expected
    assert (choice.reason is None) == (expected is None)
    # A --dtype of the user's always wins.
    assert cpu_dtype.choose(_checkpoint(tmp_path, "x"), ["--dtype=bfloat16"]).dtype is None


def test_cpu_llm_is_started_in_the_checkpoints_float32_and_says_so(tmp_path):
    launch = _build(EngineSpec(model=_checkpoint(tmp_path, "float32")), tmp_path=tmp_path)
    assert _flag(launch.argv, "--dtype") == "float32"
    assert any("float32" in note for note in launch.notes)
    own = _build(
        EngineSpec(model=_checkpoint(tmp_path, "f"), extra_args=["--dtype", "bfloat16"]),
        tmp_path=tmp_path,
    )
    assert own.argv.count("--dtype") == 1 and _flag(own.argv, "--dtype") == "bfloat16"


def test_amx_permission_is_asked_of_this_kernel():
    """The probe really asks the kernel: it agrees with the CPU flags on a host without
    AMX (refused), and never raises."""
    from sagellm_cli.core.launchers import cpu_dtype

    granted = cpu_dtype.amx_granted()
    if "amx_tile" not in cpu_dtype.cpu_flags():
        assert granted is False
