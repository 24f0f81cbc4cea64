"""Seed 003's `GPUResourceManager` and `EngineLifecycleManager`, over the project's core.

Both take an optional `ControlPlane` (default: a new one on $SAGELLM_HOME) and call its
methods: the GPU inventory and ledger (`core.gpu`), the memory estimate
(`core.gpu.estimate`), and engine processes (`core.engines.manager.EngineManager`).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from sagellm_cli.core.errors import BadInput, NotFound, ResourceUnavailable

if TYPE_CHECKING:
    from sagellm_cli.core.gpu import GpuSnapshot
    from sagellm_cli.core.records import EngineRecord
    from sagellm_cli.library import ControlPlane


def _plane(control_plane: ControlPlane | None) -> ControlPlane:
    from sagellm_cli.library import ControlPlane

    return control_plane if control_plane is not None else ControlPlane()


class GPUResourceManager:
    """GPU state and logical memory reservations (seed 003). The state is NVML's (mock
    GPUs with $SAGELLM_MOCK_GPUS; none, with a reason, without NVML) combined with the
    engines' reservations in the state file. `allocate_resources` reserves in this
    object only, for your own planning: engines the project starts reserve in the state
    file themselves, and both are subtracted here."""

    def __init__(self, control_plane: ControlPlane | None = None):
        self.control_plane = _plane(control_plane)
        self._held: dict[int, float] = {}  # GPU index -> GiB this object reserved
        self._lock = threading.Lock()

    def get_system_status(self) -> GpuSnapshot:
        """The inventory with the ledger (`sage llm gpu`)."""
        return self.control_plane.gpus()

    def free_memory_gb(self) -> dict[int, float]:
        """GiB each GPU can still give: NVML's free memory less every reservation."""
        capacities = self.get_system_status().capacities
        with self._lock:
            return {c.index: max(c.free_gib - self._held.get(c.index, 0.0), 0.0)
                    for c in capacities}  # fmt: skip

    def allocate_resources(self, memory_gb: float, gpu_count: int = 1) -> list[int]:
        """Reserve `memory_gb` GiB on each of `gpu_count` GPUs (those with most room);
        the GPU indices. ResourceUnavailable when not enough GPUs have that room."""
        if isinstance(gpu_count, bool) or not isinstance(gpu_count, int) or gpu_count < 1:
            raise BadInput(f"gpu_count must be a positive integer, not {gpu_count!r}")
        if not isinstance(memory_gb, (int, float)) or memory_gb <= 0:
            raise BadInput(f"memory_gb must be a positive number, not {memory_gb!r}")
        free = self.free_memory_gb()
        fitting = sorted((i for i, gib in free.items() if gib >= memory_gb), key=lambda i: -free[i])
        if len(fitting) < gpu_count:
            raise ResourceUnavailable(
                f"{len(fitting)} GPU(s) have {memory_gb:g} GiB free; {gpu_count} needed",
                hint="`sage llm gpu` shows what is free; stop an engine or ask for less",
            )
        chosen = sorted(fitting[:gpu_count])
        with self._lock:
            for index in chosen:
                self._held[index] = self._held.get(index, 0.0) + memory_gb
        return chosen

    def release_resources(self, gpu_ids: list[int], memory_gb: float) -> None:
        """Give back what `allocate_resources(memory_gb, ...)` reserved on `gpu_ids`."""
        with self._lock:
            for index in gpu_ids:
                left = self._held.get(index, 0.0) - memory_gb
                if left > 1e-9:
                    self._held[index] = left
                else:
                    self._held.pop(index, None)

    def estimate_model_memory(
        self,
        model: str,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        max_model_len: int | None = None,
        kind: str = "llm",
    ) -> float:
        """GiB per GPU that serving `model` needs (weights, KV cache, overhead), as engine
        start plans it. BadInput when the model's size can't be known."""
        from sagellm_cli.core.gpu import estimate_memory

        estimate = estimate_memory(model, kind=kind, tensor_parallel=tensor_parallel_size,
                                   pipeline_parallel=pipeline_parallel_size,
                                   max_model_len=max_model_len)  # fmt: skip
        return estimate.gib_per_gpu


class EngineLifecycleManager:
    """Start, stop and list engine processes (seed 003), as `sage llm engine` does."""

    def __init__(self, control_plane: ControlPlane | None = None):
        self.control_plane = _plane(control_plane)

    def spawn_engine(
        self,
        model_id: str,
        engine_kind: str = "llm",
        *,
        port: int | None = None,
        use_gpu: bool | None = None,
        tensor_parallel: int | None = None,
        pipeline_parallel: int | None = None,
        wait: bool = True,
        timeout: float = 600.0,
        **spec: Any,
    ) -> str:
        """Start an engine (`llm`: vLLM, `embedding`: the embedding server) and return its
        id; waits until ready unless `wait=False`. `spec` takes EngineSpec's fields."""
        options = {"port": port, "use_gpu": use_gpu, "tensor_parallel": tensor_parallel,
                   "pipeline_parallel": pipeline_parallel}  # fmt: skip
        spec.update({k: v for k, v in options.items() if v is not None})
        record = self.control_plane.start_engine(model_id, engine_kind, wait=wait,
                                                 timeout=timeout, **spec)  # fmt: skip
        return record.id

    def stop_engine(self, engine_id: str, timeout: float = 30.0) -> bool:
        """Stop an engine's process group; False if there was no such engine."""
        try:
            self.control_plane.stop_engine(engine_id, timeout=timeout)
        except NotFound:
            return False
        return True

    def get_engine_status(self, engine_id: str) -> EngineRecord:
        """The engine's record (`.status`, `.url`, `.runtime`, ...); NotFound if unknown."""
        return self.control_plane.engine(engine_id)

    def list_engines(self, include_stopped: bool = False) -> list[EngineRecord]:
        """The live engines (with `include_stopped`, stopped and failed ones too)."""
        return self.control_plane.engines(all=include_stopped)
