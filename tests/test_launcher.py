"""Launchers: the node kind -> launcher registry, the GPU rule, and run identity."""

from __future__ import annotations

import socket
import sys

import pytest

from sagellm_cli.core.launchers.base import LocalLauncher, launcher_for, node_kind
from sagellm_cli.core.launchers.external import ExternalLauncher
from sagellm_cli.core.records import EngineRecord, EngineSpec


def test_each_node_kind_has_its_launcher_kept_per_node():
    assert isinstance(launcher_for("local"), LocalLauncher)
    external = launcher_for("external:10.0.0.5")
    assert isinstance(external, ExternalLauncher) and external.node == "external:10.0.0.5"
    assert launcher_for("external:10.0.0.5") is external
    ray = launcher_for("ray:0123456789abcdef")
    assert type(ray).__name__ == "RayLauncher" and ray.node == "ray:0123456789abcdef"
    assert not ray.on_this_machine and not external.on_this_machine
    assert launcher_for("local").on_this_machine


def test_an_unknown_node_kind_is_refused():
    assert node_kind("k8s:pod-1") == "k8s"
    with pytest.raises(NotImplementedError, match="k8s:pod-1"):
        launcher_for("k8s:pod-1")


@pytest.mark.parametrize(
    ("kind", "use_gpu", "gpus_exist", "count"),
    [
        ("embedding", None, True, 0),  # embedding engines default to the CPU
        ("llm", None, False, 0),  # an llm may use a GPU: the CPU build without one
        ("llm", None, True, 4),
        ("llm", False, True, 0),
        ("llm", True, False, 4),  # must have one: counted, and placement refuses
    ],
)
def test_gpu_count_is_the_one_gpu_rule(kind, use_gpu, gpus_exist, count):
    spec = EngineSpec(model="m", kind=kind, use_gpu=use_gpu, tensor_parallel=2,
                      pipeline_parallel=2)  # fmt: skip
    assert spec.gpu_count(gpus_exist) == count


def test_a_local_run_is_named_pid_at_host(local_home):
    launcher = launcher_for("local")
    handle = launcher.spawn("abcd1234", [sys.executable, "-c", "pass"], {},
                            local_home / "abcd1234.log")  # fmt: skip
    assert handle.instance == f"{handle.pid}@{socket.gethostname()}"


def test_a_backend_tells_a_new_run_from_the_old_one_by_instance():
    from sagellm_cli.gateway.routing.backend import Backend

    def record(instance: str) -> EngineRecord:
        return EngineRecord(id="e1", kind="llm", runtime="vllm", model="m",
                            served_model_name="m", host="127.0.0.1", port=8001, pid=42,
                            instance=instance)  # fmt: skip

    backend = Backend(record("42@a"))
    assert backend.same_process(record("42@a"))
    assert not backend.same_process(record("42@b"))  # the same pid, another run
