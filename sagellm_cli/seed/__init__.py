"""The seeds' (001, 002, 003, 004) control-plane names, as a thin layer over `ControlPlane`.

`from sagellm_cli import ControlPlaneManager, ExecutionInstance, RequestMetadata, ...`
loads this package on first use (`import sagellm_cli` stays cheap). docs/library.md has
the table of seed name -> implementation, and says where the meaning differs.
"""

from sagellm_cli.seed.lifecycle import EngineLifecycleManager, GPUResourceManager
from sagellm_cli.seed.manager import (
    ControlPlaneManager,
    PerformanceMetrics,
    RequestState,
    process_request,
)
from sagellm_cli.seed.types import (
    DecodingConfig,
    ExecutionInstance,
    ExecutionInstanceType,
    ParallelismConfig,
    PDSeparationConfig,
    PrefillingConfig,
    RequestMetadata,
    RequestPriority,
)

__all__ = [
    "ControlPlaneManager",
    "DecodingConfig",
    "EngineLifecycleManager",
    "ExecutionInstance",
    "ExecutionInstanceType",
    "GPUResourceManager",
    "PDSeparationConfig",
    "ParallelismConfig",
    "PerformanceMetrics",
    "PrefillingConfig",
    "RequestMetadata",
    "RequestPriority",
    "RequestState",
    "process_request",
]
