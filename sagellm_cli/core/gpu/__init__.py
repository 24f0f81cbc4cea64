"""GPUs as a managed resource: NVML inventory, memory estimates, placement, the ledger.

Importing this package is cheap: pynvml and psutil are imported only when read.
"""

from sagellm_cli.core.gpu.estimate import MemoryEstimate, estimate_memory, recommend_layouts
from sagellm_cli.core.gpu.inventory import GpuInfo, Inventory, engine_pid_map, read_inventory
from sagellm_cli.core.gpu.placement import HEADROOM_GIB, GpuCapacity, capacities, choose_gpus
from sagellm_cli.core.gpu.plan import (
    GpuSnapshot,
    ModelPlan,
    Placement,
    gpu_snapshot,
    plan_gpu,
    plan_model,
    reservation_fits,
)

__all__ = [
    "HEADROOM_GIB",
    "GpuCapacity",
    "GpuInfo",
    "GpuSnapshot",
    "Inventory",
    "MemoryEstimate",
    "ModelPlan",
    "Placement",
    "capacities",
    "choose_gpus",
    "engine_pid_map",
    "estimate_memory",
    "gpu_snapshot",
    "plan_gpu",
    "plan_model",
    "read_inventory",
    "recommend_layouts",
    "reservation_fits",
]
