"""GPU memory estimate per GPU, and the recommended TP/PP for a model size.

Per GPU: weights (parameter count x dtype bytes / (TP x PP)) + a KV-cache budget +
a fixed overhead (CUDA context, activations, CUDA graphs). The parameter count
comes, in order of preference, from safetensors headers or index of a local copy
(a path, sagellm's model cache, or the Hugging Face cache), from config.json's
shapes, or from the size in the name (`1.5B`, `270M`, `8x7B`). Stdlib only.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sagellm_cli.core.errors import BadInput

GIB = 1024**3

# Fixed per-GPU overhead: CUDA context (~0.5 GiB), activation peak of the profiling
# run, CUDA graphs and NCCL buffers for vLLM; context plus activations for
# sentence-transformers.
OVERHEAD_GIB = {"llm": 2.0, "embedding": 1.0}
# The KV budget covers at least one full-length sequence (vLLM refuses to start
# otherwise) and at least this many tokens of concurrent work.
KV_MIN_TOKENS = 16384
# When the KV shape is unknown: a share of the weights, never under this.
KV_FALLBACK_MIN_GIB = 1.0
KV_FALLBACK_SHARE = 0.25
# What a model of unknown size is planned with, per GPU (stated in the plan's notes).
UNKNOWN_SIZE_GIB = {"llm": 24.0, "embedding": 4.0}
# Activation room for embedding models (no KV cache).
EMBEDDING_ACTIVATIONS_GIB = 0.5

_SAFETENSORS_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
    "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "F8_E8M0": 1, "F4": 0.5, "F6_E2M3": 0.75, "F6_E3M2": 0.75,
}  # fmt: skip
_DTYPE_BYTES = {
    "float32": 4, "float": 4, "fp32": 4, "float16": 2, "half": 2, "fp16": 2,
    "bfloat16": 2, "bf16": 2, "float64": 8, "fp8": 1, "float8": 1, "int8": 1,
}  # fmt: skip
# Encoder-style models use a 2-matrix MLP; decoder LLMs today mostly use a gated 3-matrix one.
_TWO_MATRIX_MLP = {
    "bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "deberta",
    "deberta-v2", "gpt2", "gpt_neox", "opt", "bloom", "falcon", "gptj", "nomic_bert",
    "new", "modernbert", "t5", "mt5",
}  # fmt: skip

# Size in a model name: `1.5B`, `270m`, `8x7B`, `1T`; not `A3B` (active params) nor `4k`.
_NAME_SIZE = re.compile(r"(?<![A-Za-z0-9.])(?:(\d+)x)?(\d+(?:\.\d+)?)([bmt])(?![a-z0-9])", re.I)
_NAME_4BIT = re.compile(r"awq|gptq|int4|4bit|4-bit|w4a16|nf4|bnb|q4", re.I)
_NAME_8BIT = re.compile(r"fp8|int8|8bit|8-bit|w8a8|w8a16|q8", re.I)


@dataclass
class ModelWeights:
    """What we know of a model's size without loading it."""

    model: str
    params: float | None
    source: str  # safetensors | safetensors-index | bin-index | config | name | unknown
    model_dir: str | None = None
    checkpoint_bytes: int | None = None
    config: dict[str, Any] | None = field(default=None, repr=False)
    quant_bits: float | None = None

    @property
    def params_b(self) -> float | None:
        return self.params / 1e9 if self.params else None


@dataclass
class MemoryEstimate:
    """GiB needed on each GPU, with its parts."""

    model: str
    kind: str
    tensor_parallel: int
    pipeline_parallel: int
    params: float | None
    params_source: str
    dtype: str
    bytes_per_param: float
    weights_gib: float
    weights_gib_per_gpu: float
    kv_gib_per_gpu: float
    overhead_gib_per_gpu: float
    gib_per_gpu: float
    override: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def gpu_count(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["gpu_count"] = self.gpu_count
        return data


# --------------------------------------------------------------------------- locating


def hf_cache_snapshot(repo_id: str) -> Path | None:
    """The newest snapshot folder of `repo_id` in the Hugging Face cache, if any."""
    from sagellm_cli.core.models.embedding import hf_hub_cache_dir

    snapshots = hf_hub_cache_dir() / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    try:
        candidates = [p for p in snapshots.iterdir() if p.is_dir()]
    except OSError:
        return None
    with_config = [p for p in candidates if (p / "config.json").is_file()]
    pool = with_config or candidates
    return max(pool, key=lambda p: p.stat().st_mtime) if pool else None


def find_model_dir(model: str, kind: str = "llm") -> Path | None:
    """A local folder for `model`: a path, sagellm's model cache, or the HF cache."""
    from sagellm_cli.core import paths

    expanded = Path(model).expanduser()
    if expanded.is_dir():
        return expanded
    if kind == "embedding":
        from sagellm_cli.core.models.embedding import resolve_embedding_model

        resolved = Path(resolve_embedding_model(model)).expanduser()
        if resolved.is_dir():
            return resolved
    with_slashes_flat = model.replace("/", "--")
    for candidate in (paths.models_dir() / model, paths.models_dir() / with_slashes_flat):
        if candidate.is_dir():
            return candidate
    if "/" in model and not model.startswith(("/", ".", "~")):
        return hf_cache_snapshot(model)
    if kind == "embedding":
        return hf_cache_snapshot(f"sentence-transformers/{model}")
    return None


# --------------------------------------------------------------------------- counting


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def safetensors_header(path: Path) -> dict[str, Any] | None:
    """The JSON header of a .safetensors file (8-byte length, then JSON), or None."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                return None
            (length,) = struct.unpack("<Q", raw)
            if length <= 0 or length > 100 * 1024**2:
                return None
            header = json.loads(fh.read(length))
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) else None


def _count_safetensors(files: list[Path]) -> tuple[float, int] | None:
    params = 0
    nbytes = 0.0
    for path in files:
        header = safetensors_header(path)
        if header is None:
            return None
        for name, tensor in header.items():
            if name == "__metadata__" or not isinstance(tensor, dict):
                continue
            count = math.prod(int(d) for d in tensor.get("shape", []))
            params += count
            nbytes += count * _SAFETENSORS_BYTES.get(str(tensor.get("dtype")), 2)
    return float(params), int(nbytes)


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """Multimodal configs keep the language model's shape under text_config."""
    inner = config.get("text_config")
    if isinstance(inner, dict) and "hidden_size" not in config:
        return {**inner, "model_type": inner.get("model_type", config.get("model_type"))}
    return config


def config_dtype(config: dict[str, Any] | None) -> str | None:
    """The checkpoint dtype named in config.json (`torch_dtype`, or `dtype` in newer files)."""
    if not config:
        return None
    for cfg in (config, _text_config(config)):
        value = cfg.get("torch_dtype") or cfg.get("dtype")
        if isinstance(value, str):
            return value.lower()
    return None


def params_from_config(config: dict[str, Any]) -> float | None:
    """Parameter count from config.json shapes (llama-like decoders, BERT-like encoders, MoE)."""
    cfg = _text_config(config)
    try:
        h = int(cfg["hidden_size"])
        layers = int(cfg["num_hidden_layers"])
        vocab = int(cfg.get("vocab_size") or 32000)
    except (KeyError, TypeError, ValueError):
        return None
    heads = int(cfg.get("num_attention_heads") or max(h // 128, 1))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or h // heads)
    inter = int(cfg.get("intermediate_size") or cfg.get("ffn_dim") or 4 * h)
    attn = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2
    mats = 2 if str(cfg.get("model_type", "")).lower() in _TWO_MATRIX_MLP else 3
    experts = int(
        cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts") or 0
    )
    if experts:
        moe_inter = int(cfg.get("moe_intermediate_size") or inter)
        shared = int(cfg.get("n_shared_experts") or 0)
        mlp = (experts + shared) * mats * h * moe_inter + h * experts
    else:
        mlp = mats * h * inter
    tied = cfg.get("tie_word_embeddings", config.get("tie_word_embeddings", True))
    embeddings = vocab * h * (1 if tied else 2)
    positions = int(cfg.get("max_position_embeddings") or 0) * h if mats == 2 else 0
    return float(layers * (attn + mlp + 4 * h) + embeddings + positions)


def params_from_name(name: str) -> float | None:
    """Size in the model name: `Qwen2.5-1.5B` -> 1.5e9, `gemma-3-270m` -> 2.7e8, `8x7B` -> 5.6e10."""
    best = None
    for match in _NAME_SIZE.finditer(Path(name).name or name):
        experts = int(match.group(1) or 1)
        scale = {"m": 1e6, "b": 1e9, "t": 1e12}[match.group(3).lower()]
        value = experts * float(match.group(2)) * scale
        best = value if best is None else max(best, value)
    return best


def _offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def params_from_hub(model: str, timeout: float = 5.0) -> float | None:
    """The parameter count from the Hub's safetensors metadata (headers only, no weights).

    None offline, for anything that is not a `org/name` id, or on any failure.
    """
    if _offline() or model.count("/") != 1 or model.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import constants, get_safetensors_metadata
    except ImportError:
        return None
    previous = constants.HF_HUB_ETAG_TIMEOUT
    try:
        constants.HF_HUB_ETAG_TIMEOUT = timeout
        meta = get_safetensors_metadata(model)
        counts = getattr(meta, "parameter_count", None) or {}
        total = sum(int(n) for n in counts.values())
    except Exception:  # noqa: BLE001 - no network, gated repo, no safetensors: fall back
        return None
    finally:
        constants.HF_HUB_ETAG_TIMEOUT = previous
    return float(total) if total > 0 else None


def _quant_bits(config: dict[str, Any] | None, model: str) -> float | None:
    qc = (config or {}).get("quantization_config")
    if isinstance(qc, dict):
        for key in ("bits", "w_bit", "weight_bits", "num_bits"):
            if isinstance(qc.get(key), (int, float)):
                return float(qc[key])
        method = str(qc.get("quant_method", "")).lower()
        if "fp8" in method or "int8" in method or qc.get("load_in_8bit"):
            return 8.0
        if method in ("awq", "gptq", "bitsandbytes", "marlin", "hqq") or qc.get("load_in_4bit"):
            return 4.0
        if method:
            return 8.0
    if _NAME_4BIT.search(model):
        return 4.0
    if _NAME_8BIT.search(model):
        return 8.0
    return None


def read_weights(model: str, kind: str = "llm") -> ModelWeights:
    """Parameter count and checkpoint size of `model`, from the best source available."""
    folder = find_model_dir(model, kind)
    config = _read_json(folder / "config.json") if folder else None
    bits = _quant_bits(config, model)
    if folder is not None:
        shards = sorted(folder.glob("*.safetensors"))
        index = _read_json(folder / "model.safetensors.index.json")
        expected = set((index or {}).get("weight_map", {}).values())
        complete = not expected or expected <= {p.name for p in shards}
        counted = _count_safetensors(shards) if shards and complete else None
        if counted:
            params, nbytes = counted
            if bits and config:
                # Packed quantized tensors undercount parameters; the shapes know better.
                params = params_from_config(config) or params
            return ModelWeights(model, params, "safetensors", str(folder), nbytes, config, bits)
        for name, source in (
            ("model.safetensors.index.json", "safetensors-index"),
            ("pytorch_model.bin.index.json", "bin-index"),
        ):
            data = _read_json(folder / name)
            total = (data or {}).get("metadata", {}).get("total_size")
            if isinstance(total, (int, float)) and total > 0:
                per = _DTYPE_BYTES.get(config_dtype(config) or "", 2)
                params = (params_from_config(config) if bits and config else None) or total / per
                return ModelWeights(model, params, source, str(folder), int(total), config, bits)
        if config:
            params = params_from_config(config)
            if params:
                return ModelWeights(model, params, "config", str(folder), None, config, bits)
    hub = params_from_hub(model) if folder is None else None
    if hub:
        return ModelWeights(model, hub, "hub-metadata", None, None, config, bits)
    named = params_from_name(model)
    if named:
        return ModelWeights(
            model, named, "name", str(folder) if folder else None, None, config, bits
        )
    return ModelWeights(model, None, "unknown", str(folder) if folder else None, None, config, bits)


# --------------------------------------------------------------------------- estimating


def _arg_value(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def serve_dtype(kind: str, runtime: str | None, config: dict | None, extra_args: list[str]):
    """(dtype name, bytes per parameter) the engine will hold weights in."""
    explicit = _arg_value(extra_args, "--dtype")
    if explicit and explicit.lower() in _DTYPE_BYTES:
        return explicit.lower(), float(_DTYPE_BYTES[explicit.lower()])
    if kind == "embedding" and (runtime or "sentence-transformers") == "sentence-transformers":
        # sentence-transformers loads float32 unless told otherwise.
        return "float32", 4.0
    named = config_dtype(config)
    if named in ("bfloat16", "float16"):
        return named, 2.0
    # vLLM's dtype "auto" serves float32 checkpoints in 16-bit on GPUs.
    return "bfloat16", 2.0


def kv_bytes_per_token(config: dict[str, Any] | None, kv_bytes: float) -> float | None:
    """K and V for one token over all layers, or None when the shape is unknown."""
    if not config:
        return None
    cfg = _text_config(config)
    try:
        h = int(cfg["hidden_size"])
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
    except (KeyError, TypeError, ValueError):
        return None
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or h // heads)
    return 2.0 * layers * kv_heads * head_dim * kv_bytes


def _max_len(config: dict[str, Any] | None, requested: int | None) -> int | None:
    if requested:
        return int(requested)
    cfg = _text_config(config) if config else {}
    value = cfg.get("max_position_embeddings") or (config or {}).get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else None


def _ceil_tenth(x: float) -> float:
    return math.ceil(round(x * 10, 6)) / 10


def estimate_memory(
    model: str,
    *,
    kind: str = "llm",
    runtime: str | None = None,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    max_model_len: int | None = None,
    kv_cache_gb: float | None = None,
    gpu_memory_gb: float | None = None,
    extra_args: list[str] | None = None,
    weights: ModelWeights | None = None,
) -> MemoryEstimate:
    """GiB per GPU for `model` split over TP x PP GPUs. `gpu_memory_gb` overrides it all.

    Raises BadInput when the size can't be known and no override is given.
    """
    tp, pp = int(tensor_parallel), int(pipeline_parallel)
    if tp < 1 or pp < 1:
        raise BadInput("tensor and pipeline parallel sizes must be at least 1")
    if gpu_memory_gb is not None:
        if gpu_memory_gb <= 0:
            raise BadInput("--gpu-memory-gb must be more than 0")
        return MemoryEstimate(
            model=model, kind=kind, tensor_parallel=tp, pipeline_parallel=pp, params=None,
            params_source="override", dtype="-", bytes_per_param=0.0, weights_gib=0.0,
            weights_gib_per_gpu=0.0, kv_gib_per_gpu=0.0, overhead_gib_per_gpu=0.0,
            gib_per_gpu=float(gpu_memory_gb), override=True,
            notes=["--gpu-memory-gb overrides the estimate"],
        )  # fmt: skip
    extra_args = list(extra_args or [])
    weights = weights or read_weights(model, kind)
    if not weights.params:
        # Plan anyway, with a stated conservative figure: refusing would make a preset's
        # dry run fail on every machine that has not downloaded the model yet.
        where = (
            f"no weights or config.json in {weights.model_dir}"
            if weights.model_dir
            else "no local copy, no Hub metadata (offline?)"
        )
        gib = UNKNOWN_SIZE_GIB[kind if kind in UNKNOWN_SIZE_GIB else "llm"]
        return MemoryEstimate(
            model=model, kind=kind, tensor_parallel=tp, pipeline_parallel=pp, params=None,
            params_source="unknown", dtype="-", bytes_per_param=0.0, weights_gib=0.0,
            weights_gib_per_gpu=0.0, kv_gib_per_gpu=0.0, overhead_gib_per_gpu=0.0,
            gib_per_gpu=gib, notes=[
                f"size of {model} unknown ({where}, no size like 7B in its name): planned "
                f"with a conservative {gib:g} GiB per GPU; set gpu_memory_gb to choose",
            ],
        )  # fmt: skip
    notes: list[str] = []
    dtype, per_param = serve_dtype(kind, runtime, weights.config, extra_args)
    kv_elem = per_param  # the KV cache stays in the compute dtype even for quantized weights
    if weights.quant_bits and weights.quant_bits < per_param * 8:
        # Quantized: the checkpoint size is the best guide; scales add a little.
        per_param = weights.quant_bits / 8 * 1.1
        dtype = f"{weights.quant_bits:g}-bit"
        weights_bytes = weights.checkpoint_bytes or weights.params * per_param
    else:
        weights_bytes = weights.params * per_param
    weights_gib = weights_bytes / GIB
    per_gpu_weights = weights_gib / (tp * pp)
    if kind == "embedding":
        kv = EMBEDDING_ACTIVATIONS_GIB
        notes.append("embedding model: no KV cache, activation room instead")
    elif kv_cache_gb is not None:
        kv = float(kv_cache_gb)
        notes.append("KV cache from --kv-cache-gb")
    else:
        kv_dtype = _arg_value(extra_args, "--kv-cache-dtype") or ""
        kv_elem = 1.0 if kv_dtype.startswith("fp8") else kv_elem
        per_token = kv_bytes_per_token(weights.config, kv_elem)
        max_len = _max_len(weights.config, max_model_len)
        if per_token and max_len:
            tokens = max(max_len, KV_MIN_TOKENS)
            kv = max(per_token * tokens / GIB / (tp * pp), 0.25)
            notes.append(f"KV cache for {tokens} tokens (max model len {max_len})")
        else:
            kv = max(KV_FALLBACK_MIN_GIB, KV_FALLBACK_SHARE * per_gpu_weights)
            notes.append("KV shape unknown: KV budget is a share of the weights")
    # vLLM's overhead (CUDA graphs, profiling peak) applies to its embedding runner too.
    uses_vllm = kind == "llm" or runtime == "vllm"
    overhead = OVERHEAD_GIB["llm" if uses_vllm else "embedding"]
    total = _ceil_tenth(per_gpu_weights + kv + overhead)
    if weights.source == "name":
        notes.append("parameter count taken from the model name")
    return MemoryEstimate(
        model=model, kind=kind, tensor_parallel=tp, pipeline_parallel=pp,
        params=weights.params, params_source=weights.source, dtype=dtype,
        bytes_per_param=round(per_param, 3), weights_gib=round(weights_gib, 3),
        weights_gib_per_gpu=round(per_gpu_weights, 3), kv_gib_per_gpu=round(kv, 3),
        overhead_gib_per_gpu=overhead, gib_per_gpu=total, notes=notes,
    )  # fmt: skip


def estimate_for_spec(spec: Any) -> MemoryEstimate:
    """`estimate_memory` for an EngineSpec."""
    return estimate_memory(
        spec.model,
        kind=spec.kind,
        runtime=spec.runtime,
        tensor_parallel=spec.tensor_parallel,
        pipeline_parallel=spec.pipeline_parallel,
        max_model_len=spec.max_model_len,
        kv_cache_gb=spec.kv_cache_gb,
        gpu_memory_gb=spec.gpu_memory_gb,
        extra_args=list(spec.extra_args or []),
    )


# --------------------------------------------------------------------------- TP/PP advice

# Seed 001's table. Bounds carry ~5% slack so that nominal sizes (a "70B" model has
# 70.6e9 parameters) land in the tier their name suggests.
RECOMMENDATIONS: list[tuple[float, str, list[tuple[int, int]]]] = [
    (10.5e9, "under 10B: TP 1-2", [(1, 1), (2, 1)]),
    (30.0e9, "10-30B: TP 4", [(4, 1)]),
    (73.5e9, "30-70B: TP 4-8", [(4, 1), (8, 1)]),
    (183.75e9, "70-175B: TP 4 x PP 2", [(4, 2)]),
    (math.inf, "over 175B: TP 8 x PP 4", [(8, 4)]),
]


def recommend_layouts(params: float) -> tuple[str, list[tuple[int, int]]]:
    """(tier label, [(tp, pp), ...] in order of preference) for a parameter count."""
    for bound, label, layouts in RECOMMENDATIONS:
        if params < bound:
            return label, list(layouts)
    return RECOMMENDATIONS[-1][1], list(RECOMMENDATIONS[-1][2])


def layout_for_gpu_count(count: int) -> tuple[int, int]:
    """TP x PP for `--gpus N`: TP up to 8 inside a node, PP for the rest."""
    if count < 1:
        raise BadInput("--gpus must be at least 1")
    if count <= 8:
        return count, 1
    if count % 8:
        raise BadInput(f"--gpus {count}: above 8 GPUs use a multiple of 8 (TP 8 x PP N)")
    return 8, count // 8
