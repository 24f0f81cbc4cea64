"""The KV cache a GPU vLLM engine gets, derived from its reservation, and how engines that
share a GPU start (`SAGELLM_GPU_START_MODE`).

vLLM sizes its KV cache from free-memory readings taken while it profiles, so a neighbour
loading meanwhile corrupts them (measured on an H200: 19.5 and 1.5 GiB for two 20 GiB
reservations). `--kv-cache-memory-bytes` sizes the cache without that reading: given

    kv = reservation - CUDA context - weights - activation peak - CUDA graphs

(per GPU), engines on one GPU can load together. Where that can't be trusted (no local
copy of the model, so no shapes; a reservation too small for one full sequence), the
engine profiles as vLLM does, and the next start on its GPU waits until it has sized its
KV cache (vLLM logs it) instead of until it is ready: a pipeline. Stdlib only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from sagellm_cli.core.errors import BadInput
from sagellm_cli.core.gpu.estimate import (
    GIB,
    _arg_value,
    _max_len,
    _text_config,
    find_model_dir,
    kv_bytes_per_token,
    read_weights,
    serve_dtype,
)

# ---------------------------------------------------------------- the overhead table
# GPU memory of a vLLM engine besides its weights and KV cache, per GPU. Sources:
# - CONTEXT: CUDA context, cuBLAS workspaces and other non-torch memory of a process:
#   measured 0.50-0.51 GiB for a one-GPU engine on an H200 (vLLM 0.24, docs/gpu.md), and
#   1.52-1.54 GiB per rank with TP 2 (NCCL buffers); 0.1 GiB spare on each.
CONTEXT_GIB = 0.6
CONTEXT_GIB_PARALLEL = 1.6
# - CUDA graphs: vLLM's "Graph capturing finished in N secs, took X GiB" for models up to
#   ~2 B parameters with the default capture sizes; an engine asleep (weights and KV cache
#   released) kept 1.3 GiB in all for the 1.2 B test model (context + graphs + cached
#   activations, docs/benchmarks.md). Nothing with --enforce-eager.
CUDA_GRAPHS_GIB = 0.3
# - Activation peak: vLLM's profile run pushes max_num_batched_tokens through the model;
#   per token, about three intermediate-size and four hidden-size tensors are alive at the
#   widest point (gate/up, activation, residual, norm, attention out), in the serve dtype.
#   Sampling holds float32 logits (and probabilities, log-probabilities) of max_num_seqs
#   rows. vLLM 0.24's defaults for its API server on 70+ GiB GPUs: 8192 tokens (its log
#   says "compile range (1, 8192)" on the H200), 1024 sequences.
ACTIVATION_TENSORS = {"intermediate": 3, "hidden": 4}
SAMPLER_COPIES = 3
DEFAULT_BATCHED_TOKENS = 8192
DEFAULT_MAX_SEQS = 1024
# A derived KV cache under this is not worth starting (and hides a bad estimate).
KV_MIN_GIB = 0.1

# ---------------------------------------------------------------- start modes
START_MODE_ENV = "SAGELLM_GPU_START_MODE"
CONCURRENT = "concurrent"  # KV bytes derived: engines on one GPU load together
PIPELINE = "pipeline"  # vLLM profiles; the next start waits for the KV-cache log line
SERIAL = "serial"  # vLLM profiles; the next start waits until the previous one is ready
START_MODES = (CONCURRENT, PIPELINE, SERIAL)
DEFAULT_START_MODE = CONCURRENT


def start_mode() -> str:
    """The start mode for GPU engines: `SAGELLM_GPU_START_MODE`, default concurrent."""
    value = (os.environ.get(START_MODE_ENV) or DEFAULT_START_MODE).strip().lower()
    if value not in START_MODES:
        raise BadInput(
            f"{START_MODE_ENV}={value!r} is not a start mode",
            hint=f"use one of {', '.join(START_MODES)}",
        )
    return value


def context_gib(gpu_count: int) -> float:
    """Per-process memory outside vLLM's (or torch's) own accounting, per GPU."""
    return CONTEXT_GIB_PARALLEL if gpu_count > 1 else CONTEXT_GIB


@dataclass
class KvBudget:
    """The KV cache bytes to hand vLLM (None: let it profile), with the parts and why."""

    kv_bytes: int | None
    reason: str
    parts_gib: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kv_cache_memory_bytes": self.kv_bytes,
            "reason": self.reason,
            "parts_gib": self.parts_gib,
        }


def _int_arg(args: list[str], flag: str, default: int) -> int:
    value = _arg_value(args, flag)
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def activation_gib(
    config: dict[str, Any], per_param: float, tensor_parallel: int, extra_args: list[str]
) -> float | None:
    """The activation peak of vLLM's profile run per GPU, from config.json's shapes."""
    cfg = _text_config(config)
    try:
        hidden = int(cfg["hidden_size"])
        vocab = int(cfg.get("vocab_size") or config.get("vocab_size"))
    except (KeyError, TypeError, ValueError):
        return None
    intermediate = int(cfg.get("intermediate_size") or 4 * hidden)
    tokens = _int_arg(extra_args, "--max-num-batched-tokens", DEFAULT_BATCHED_TOKENS)
    seqs = _int_arg(extra_args, "--max-num-seqs", DEFAULT_MAX_SEQS)
    per_token = (
        ACTIVATION_TENSORS["intermediate"] * intermediate / tensor_parallel
        + ACTIVATION_TENSORS["hidden"] * hidden
    ) * per_param
    sampler = min(seqs, tokens) * vocab * 4.0 * SAMPLER_COPIES
    return (tokens * per_token + sampler) / GIB


def derive_kv_budget(spec: Any, runtime: str, gib_per_gpu: float, gpu_count: int) -> KvBudget:
    """`--kv-cache-memory-bytes` for a vLLM engine reserving `gib_per_gpu` on each GPU, or
    None (with the reason) when the estimate can't be trusted and vLLM must profile.

    Reads only a local copy of the model (no network: this runs under the state lock).
    """
    if runtime != "vllm":
        return KvBudget(None, f"{runtime} has no KV cache to size")
    if spec.kv_cache_gb is not None:
        return KvBudget(int(spec.kv_cache_gb * GIB), "KV cache from --kv-cache-gb")
    extra = list(spec.extra_args or [])
    if _arg_value(extra, "--kv-cache-memory-bytes") or _arg_value(
        extra, "--num-gpu-blocks-override"
    ):
        return KvBudget(None, "the KV cache size is set in extra_args")
    if find_model_dir(spec.model, spec.kind) is None:
        return KvBudget(None, "no local copy of the model: its shapes are unknown")
    weights = read_weights(spec.model, spec.kind)
    if not weights.params or not weights.config:
        return KvBudget(None, "no config.json or weights to read the model's size from")
    if weights.quant_bits:
        return KvBudget(None, "quantized weights: their size on the GPU is not estimated")
    _, per_param = serve_dtype(spec.kind, runtime, weights.config, extra)
    tp = int(spec.tensor_parallel)
    weights_gib = weights.params * per_param / GIB / gpu_count
    activations = activation_gib(weights.config, per_param, tp, extra)
    if activations is None:
        return KvBudget(None, "config.json lacks hidden_size or vocab_size")
    graphs = 0.0 if "--enforce-eager" in extra else CUDA_GRAPHS_GIB
    context = context_gib(gpu_count)
    kv_gib = gib_per_gpu - context - weights_gib - activations - graphs
    parts = {
        "reserved": round(gib_per_gpu, 3),
        "context": context,
        "weights": round(weights_gib, 3),
        "activations": round(activations, 3),
        "cuda_graphs": graphs,
        "kv_cache": round(kv_gib, 3),
    }
    # vLLM refuses to start unless one full-length sequence fits.
    kv_elem = 1.0 if (_arg_value(extra, "--kv-cache-dtype") or "").startswith("fp8") else 2.0
    per_token = kv_bytes_per_token(weights.config, kv_elem) or 0.0
    max_len = _max_len(weights.config, spec.max_model_len) or 0
    one_sequence = per_token * max_len / GIB / gpu_count
    need = max(one_sequence, KV_MIN_GIB)
    if kv_gib < need:
        return KvBudget(
            None,
            f"the reservation leaves {kv_gib:.2f} GiB for the KV cache, under the "
            f"{need:.2f} GiB one sequence needs",
            parts,
        )
    return KvBudget(int(kv_gib * GIB), "derived from the reservation", parts)
