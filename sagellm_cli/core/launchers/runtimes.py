"""Command lines for each runtime. Pure functions: nothing is started here."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sagellm_cli.core.errors import BadInput
from sagellm_cli.core.launchers import cpu_dtype
from sagellm_cli.core.models.cache import model_argument
from sagellm_cli.core.paths import engine_python
from sagellm_cli.core.records import SENTENCE_TRANSFORMERS

if TYPE_CHECKING:
    from sagellm_cli.core.gpu import Placement
    from sagellm_cli.core.records import EngineSpec


# vLLM serves /v1/load_lora_adapter and /v1/unload_lora_adapter only with this set.
LORA_RUNTIME_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"

# Memory-safe CPU defaults (see docs/notes-vllm-tiny.md): without a KV bound vLLM
# takes ~12 GiB on CPU; torch.compile and the multiprocess engine cost 2x start time.
CPU_DEFAULT_KV_CACHE_GB = 1.0
CPU_DEFAULT_MAX_MODEL_LEN = 2048


@dataclass
class LaunchSpec:
    """What the launcher runs: argv (never through a shell) and the env additions."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    # Choices made for the user, said in the engine log and the plan (e.g. a CPU dtype).
    notes: list[str] = field(default_factory=list)


def local_max_position(model: str) -> int | None:
    """`max_position_embeddings` of a local model folder, if readable."""
    config = Path(model).expanduser() / "config.json"
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    text_config = data.get("text_config") or {}
    value = data.get("max_position_embeddings") or text_config.get("max_position_embeddings")
    return int(value) if isinstance(value, int) else None


def build_launch(
    spec: EngineSpec,
    *,
    runtime: str,
    port: int,
    served_model_name: str,
    placement: Placement | None,
    scratch_dir: Path,
    cache_dir: Path | None,
    cpu_cores: list[int] | None = None,
    kv_events_port: int | None = None,
    nixl_port: int | None = None,
    on_this_machine: bool = True,
) -> LaunchSpec:
    """The argv and env for one engine, given its port, GPU placement and CPU cores (and,
    vLLM only, the port of its KV-event publisher and NixlConnector's side-channel port).
    `on_this_machine` is the launcher's (`Launcher.on_this_machine`)."""
    # A path or cache entry is this machine's; an engine elsewhere resolves its own name.
    model = model_argument(spec.model) if on_this_machine else spec.model
    if runtime == SENTENCE_TRANSFORMERS:
        return _sentence_transformers(spec, model, port, served_model_name, placement)
    launch = _vllm(
        spec, model, port, served_model_name, placement, scratch_dir, cache_dir, kv_events_port,
        nixl_port, on_this_machine,
    )  # fmt: skip
    if placement is None and cpu_cores:
        launch.env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cpu_cores))
        launch.env["OMP_NUM_THREADS"] = str(len(cpu_cores))
    return launch


def _server_argv(module: str, model: str, served: str, spec: EngineSpec, port: int) -> list[str]:
    # Both servers take the same core options, by the same names.
    return [
        engine_python(),
        "-m",
        module,
        "--model",
        model,
        "--served-model-name",
        served,
        "--host",
        spec.host,
        "--port",
        str(port),
    ]


def _sentence_transformers(
    spec: EngineSpec, model: str, port: int, served: str, placement: Placement | None
) -> LaunchSpec:
    argv = _server_argv("sagellm_cli.servers.embedding", model, served, spec, port)
    argv += ["--device", "cuda" if placement else "cpu"]
    if placement:
        argv += ["--gpu-memory-fraction", f"{placement.gpu_memory_utilization:.3f}"]
        env = placement.env()
    else:
        env = {"CUDA_VISIBLE_DEVICES": ""}
    return LaunchSpec(argv=argv + spec.extra_args, env=env)


def _vllm(
    spec: EngineSpec,
    model: str,
    port: int,
    served: str,
    placement: Placement | None,
    scratch_dir: Path,
    cache_dir: Path | None,
    kv_events_port: int | None = None,
    nixl_port: int | None = None,
    on_this_machine: bool = True,
) -> LaunchSpec:
    argv = _server_argv("vllm.entrypoints.openai.api_server", model, served, spec, port)
    if spec.kind == "embedding":
        argv += ["--runner", "pooling"]
    env: dict[str, str] = {"TMPDIR": str(scratch_dir)}
    notes: list[str] = []
    if cache_dir is not None:  # `cache: private`; otherwise vLLM's own (or the user's) cache
        env["VLLM_CACHE_ROOT"] = str(cache_dir)
    max_len = spec.max_model_len
    if placement is None and spec.tensor_parallel * spec.pipeline_parallel > 1:
        # vLLM's CPU build would start one process and silently ignore the split.
        raise BadInput(
            f"tensor_parallel {spec.tensor_parallel} x pipeline_parallel "
            f"{spec.pipeline_parallel} needs GPUs; this engine runs on the CPU",
            hint="drop --tensor-parallel/--pipeline-parallel, or run where NVML sees GPUs",
        )
    if placement is None:
        if max_len is None and spec.kind == "llm":
            limit = local_max_position(model)
            max_len = min(CPU_DEFAULT_MAX_MODEL_LEN, limit) if limit else CPU_DEFAULT_MAX_MODEL_LEN
        kv_gb = spec.kv_cache_gb if spec.kv_cache_gb is not None else CPU_DEFAULT_KV_CACHE_GB
        argv += ["--enforce-eager", "--kv-cache-memory-bytes", _bytes_arg(kv_gb)]
        argv += ["--distributed-executor-backend", "uni"]
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        dtype = cpu_dtype.choose(model, spec.extra_args)
        argv += dtype.argv()
        notes += [dtype.reason] if dtype.reason else []
    else:
        argv += [
            "--tensor-parallel-size",
            str(spec.tensor_parallel),
            "--pipeline-parallel-size",
            str(spec.pipeline_parallel),
            "--gpu-memory-utilization",
            f"{placement.gpu_memory_utilization:.3f}",
        ]
        # Sized from the reservation (or --kv-cache-gb), vLLM skips its free-memory reading,
        # so engines sharing the GPU may load together (core/gpu/kv_budget.py).
        kv_bytes = placement.kv_cache_bytes
        if kv_bytes is None and spec.kv_cache_gb is not None:
            kv_bytes = int(spec.kv_cache_gb * 1024**3)
        if kv_bytes is not None:
            argv += ["--kv-cache-memory-bytes", str(kv_bytes)]
        elif placement.kv_budget is not None:
            notes.append(f"vLLM sizes its KV cache by profiling: {placement.kv_budget.reason}")
        if spec.unload == "sleep":
            # vLLM serves /sleep and /wake_up only in its dev mode (docs/security.md).
            argv.append("--enable-sleep-mode")
            env["VLLM_SERVER_DEV_MODE"] = "1"
        env.update(placement.env())
    if max_len is not None:
        argv += ["--max-model-len", str(max_len)]
    if spec.lora:
        argv.append("--enable-lora")
        if spec.max_lora_rank is not None:
            argv += ["--max-lora-rank", str(spec.max_lora_rank)]
        if spec.lora_adapters:  # a (re)start loads the recorded adapters before `ready`
            argv += ["--lora-modules", *(f"{n}={p}" for n, p in spec.lora_adapters.items())]
        # `engine lora add|remove` load and unload adapters while the engine runs.
        env[LORA_RUNTIME_ENV] = "True"
    if kv_events_port is not None:
        argv += kv_events_argv(kv_events_port, on_this_machine)
    if spec.kv_connector:
        kv_argv, kv_env = kv_transfer_args(spec, placement is not None, nixl_port)
        argv += kv_argv
        env.update(kv_env)
    argv += spec.extra_args
    return LaunchSpec(argv=argv, env=env, notes=notes)


def kv_events_endpoint(port: int, on_this_machine: bool) -> str:
    """Where an engine's KV-event publisher goes (vLLM binds wildcard endpoints and connects
    to the others). On this machine the engine connects to the gateway's SUB socket on
    loopback, so prompts' token ids never leave the host; an engine on a Ray node binds
    every address of its node for the gateway to connect to (docs/known-issues.md)."""
    return f"tcp://127.0.0.1:{port}" if on_this_machine else f"tcp://*:{port}"


def kv_events_argv(port: int, on_this_machine: bool = True) -> list[str]:
    """vLLM's flags to publish KV-cache events over ZMQ (`kv_events_endpoint`). Prefix
    caching is on by default in vLLM V1; it is named because without it no block is stored."""
    config = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": kv_events_endpoint(port, on_this_machine),
        "topic": KV_EVENTS_TOPIC,
    }
    return ["--enable-prefix-caching", "--kv-events-config", json.dumps(config)]


# The ZMQ topic engines publish KV events under (the gateway subscribes to it).
KV_EVENTS_TOPIC = "kv"


def kv_transfer_args(
    spec: EngineSpec, on_gpu: bool, nixl_port: int | None
) -> tuple[list[str], dict[str, str]]:
    """`--kv-transfer-config` (and env) for an engine with a KV connector (docs/routing.md).

    `kv_both` on both sides, as vLLM's own P/D examples configure NIXL (0.32 would take
    kv_producer/kv_consumer too): which side sends is said per request.
    """
    config = {
        "kv_connector": spec.kv_connector,
        "kv_role": "kv_both",
        # vLLM's CPU build registers host tensors; on a GPU, device to device.
        "kv_buffer_device": "cuda" if on_gpu else "cpu",
    }
    env: dict[str, str] = {}
    if nixl_port is not None:
        env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(nixl_port)
        env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = spec.host
    return ["--kv-transfer-config", json.dumps(config, separators=(",", ":"))], env


def _bytes_arg(gib: float) -> str:
    return str(int(gib * 1024**3))
