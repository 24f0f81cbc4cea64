"""Seed 003's GPUResourceManager and EngineLifecycleManager, on mock GPUs (no engines)."""

from __future__ import annotations

import pytest


def test_gpu_resource_manager_reserves_on_mock_gpus(home, monkeypatch):
    monkeypatch.setenv("SAGELLM_MOCK_GPUS", "2x80")
    from sagellm_cli import GPUResourceManager, ResourceUnavailable

    gpus = GPUResourceManager()
    try:
        status = gpus.get_system_status()
        assert [g.index for g in status.inventory.gpus] == [0, 1]
        free = gpus.free_memory_gb()
        assert gpus.allocate_resources(50, gpu_count=2) == [0, 1]
        assert gpus.free_memory_gb()[0] == pytest.approx(free[0] - 50)
        with pytest.raises(ResourceUnavailable, match="GPU"):
            gpus.allocate_resources(50)  # 30 GiB left on each
        gpus.release_resources([0, 1], 50)
        assert gpus.free_memory_gb() == free
        assert gpus.estimate_model_memory("Qwen/Qwen2.5-7B-Instruct") > 10
    finally:
        gpus.control_plane.close()


def test_engine_lifecycle_manager_lists_and_refuses_unknown(home):
    from sagellm_cli import BadInput, EngineLifecycleManager, NotFound

    engines = EngineLifecycleManager()
    try:
        assert engines.list_engines() == [] and engines.stop_engine("nope") is False
        with pytest.raises(NotFound):
            engines.get_engine_status("nope")
        with pytest.raises(BadInput, match="unknown field"):
            engines.spawn_engine("x", max_tokens=3)
    finally:
        engines.control_plane.close()


def test_seed_types_parse_the_seeds_spellings():
    from sagellm_cli import (
        BadInput,
        ControlPlaneManager,
        ExecutionInstance,
        ExecutionInstanceType,
        PDSeparationConfig,
        RequestPriority,
    )

    assert ExecutionInstance("a", instance_type="PREFILLING").instance_type.role == "prefill"
    assert ExecutionInstance("a", instance_type="decoding").instance_type is (
        ExecutionInstanceType.DECODING
    )
    assert RequestPriority.parse("NORMAL") is RequestPriority.NORMAL
    with pytest.raises(BadInput, match="instance_type"):
        ExecutionInstance("a", instance_type="fast")
    with pytest.raises(BadInput, match="prefilling_threshold_input_tokens"):
        PDSeparationConfig(prefilling_threshold_input_tokens=0)
    with pytest.raises(BadInput, match="auto_scaling"):
        ControlPlaneManager(enable_auto_scaling=True)
