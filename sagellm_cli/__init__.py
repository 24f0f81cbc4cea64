"""sagellm-cli: the `sage llm` command line and the core behind it.

The library (docs/library.md) is importable from here; each name is loaded on first use,
so `import sagellm_cli` (and every CLI command) stays cheap.
"""

from typing import Any

__version__ = "0.1.0"

# name -> module that defines it (PEP 562 lazy attributes).
_LAZY = {
    "ControlPlane": "sagellm_cli.library",
    "GatewayHandle": "sagellm_cli.library",
    "InferenceResult": "sagellm_cli.library",
    "RequestHandle": "sagellm_cli.library",
    "RequestStatus": "sagellm_cli.library",
    "UnifiedInferenceClient": "sagellm_cli.client",
    "AsyncUnifiedInferenceClient": "sagellm_cli.client",
    "GatewayError": "sagellm_cli.client",
    "GatewayMetrics": "sagellm_cli.gateway.telemetry.stats",
    "SageError": "sagellm_cli.core.errors",
    "BadInput": "sagellm_cli.core.errors",
    "NotFound": "sagellm_cli.core.errors",
    "ResourceUnavailable": "sagellm_cli.core.errors",
    "OperationFailed": "sagellm_cli.core.errors",
    "EngineRecord": "sagellm_cli.core.records",
    # The seeds' control-plane names (docs/library.md, "The seeds' names").
    "ControlPlaneManager": "sagellm_cli.seed.manager",
    "PerformanceMetrics": "sagellm_cli.seed.manager",
    "RequestState": "sagellm_cli.seed.manager",
    "process_request": "sagellm_cli.seed.manager",
    "RequestMetadata": "sagellm_cli.seed.types",
    "RequestPriority": "sagellm_cli.seed.types",
    "ExecutionInstance": "sagellm_cli.seed.types",
    "ExecutionInstanceType": "sagellm_cli.seed.types",
    "PDSeparationConfig": "sagellm_cli.seed.types",
    "PrefillingConfig": "sagellm_cli.seed.types",
    "DecodingConfig": "sagellm_cli.seed.types",
    "ParallelismConfig": "sagellm_cli.seed.types",
    "GPUResourceManager": "sagellm_cli.seed.lifecycle",
    "EngineLifecycleManager": "sagellm_cli.seed.lifecycle",
}
# The names for core types that already exist under another name.
_ALIASES = {
    "Plan": ("sagellm_cli.core.presets.plan", "PresetPlan"),
    "ApplyResult": ("sagellm_cli.core.presets.apply", "ApplyResult"),
    "GpuInventory": ("sagellm_cli.core.gpu.plan", "GpuSnapshot"),
}

__all__ = ["__version__", *_LAZY, *_ALIASES]


def __getattr__(name: str) -> Any:
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _ALIASES:
        module, attr = _ALIASES[name]
        value = getattr(importlib.import_module(module), attr)
    else:
        raise AttributeError(f"module 'sagellm_cli' has no attribute {name!r}")
    globals()[name] = value  # cached: the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
