"""Engines on a Ray cluster (docs/cluster.md): a real two-node Ray cluster on loopback.

One module-scoped cluster (`ray.cluster_utils.Cluster`: a head node and a worker node,
each its own raylet, on this machine) serves every test here. Engines are real MiniLM
embedding servers started by the real CLI with `--cluster` or `cluster:` in a preset;
each runs under its detached actor on the node Ray chose. The tests route through a real
`sage llm serve`, remove a node with `Cluster.remove_node` (its raylet and workers are
killed, as when a machine dies) and check that its engines turn `failed`, that traffic
moves to the rest, that re-applying the preset places them again, and that nothing is
left once everything is stopped. GPUs are Ray's logical ones on a node declared with
`num_gpus` (no NVML here): the placement group, the GPU ids and CUDA_VISIBLE_DEVICES are
real Ray behaviour; no GPU engine is started.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import needs_st, sage, sage_json, wait_for
from test_gateway_support import running_gateway

MINILM = "all-MiniLM-L6-v2"
FAST_GATEWAY = ("--supervise-interval", "0.3", "--health-interval", "0.5")
# Ray notices a dead raylet within ~1.5 s with these (defaults: about 30 s).
FAST_HEALTH = {
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 3,
    "health_check_initial_delay_ms": 0,
}

# Ray must not try to report usage statistics from this offline machine.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="ray is not installed (the ray extra)"
)


@pytest.fixture(scope="module")
def ray_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ray") / "sagellm"


@contextlib.contextmanager
def _our_sigterm():
    """Every Ray node started in this process installs a SIGTERM handler (sys.exit), which
    would raise SystemExit inside whatever test runs when CI stops the suite: keep ours."""
    handler = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, handler)


@pytest.fixture(scope="module")
def cluster(ray_home):
    """Head (4 logical CPUs) and one worker node (4 CPUs); everything stopped afterwards."""
    from ray.cluster_utils import Cluster

    with _our_sigterm():
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 4, "_system_config": FAST_HEALTH},
        )
    try:
        with _our_sigterm():
            cluster.add_node(num_cpus=4)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        # Engines first (through their actors), then the cluster, then any straggler.
        with contextlib.suppress(Exception):
            sage("llm", "engine", "stop", "--all", "--timeout", "10", home=ray_home, timeout=180)
        cluster.shutdown()
        _kill_leftovers(ray_home)


def _engine_processes(home: Path, engine_id: str | None = None) -> list[psutil.Process]:
    """Processes of engines started under `home` (or of one of them)."""
    found = []
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if env.get("SAGELLM_HOME") != str(home) or "SAGELLM_ENGINE_ID" not in env:
            continue
        if engine_id is None or env["SAGELLM_ENGINE_ID"] == engine_id:
            found.append(proc)
    return found


def _kill_leftovers(home: Path) -> None:
    for proc in _engine_processes(home):
        with contextlib.suppress(psutil.Error):
            proc.kill()


def _records(home: Path) -> dict[str, dict]:
    return {r["id"]: r for r in sage_json("llm", "engine", "list", "--all", home=home)}


def _node_name(node) -> str:
    from sagellm_cli.core.launchers.ray import node_name

    return node_name(node.node_id)


def _embed_through(gateway, model: str, n: int) -> list[str]:
    """`n` embedding requests through the gateway; the engine ids that answered."""
    served = []
    for _ in range(n):
        response = httpx.post(
            gateway.v1 + "/embeddings", json={"model": model, "input": ["hi"]}, timeout=60
        )
        assert response.status_code == 200, response.text
        assert len(response.json()["data"][0]["embedding"]) == 384
        served.append(response.headers["x-sagellm-engine"])
    return served


def _named_actors(address: str) -> list[str]:
    code = (
        f"import json, ray; ray.init(address={address!r}, namespace='sagellm', "
        "logging_level='ERROR'); print(json.dumps(ray.util.list_named_actors()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- start-up


def test_cli_start_up_never_imports_ray(tmp_path):
    env = {**os.environ, "SAGELLM_HOME": str(tmp_path / "h")}
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "sagellm_cli", "llm", "engine", "list", "--json"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    modules = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert not {m for m in modules if m == "ray" or m.startswith("ray.")}
    assert not {m for m in modules if "ray_launcher" in m or "ray_actor" in m}


def test_without_ray_the_cluster_options_say_how_to_install_it(tmp_path):
    blocker = tmp_path / "noray"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['ray'] = None\n")
    env = {"PYTHONPATH": str(blocker)}
    home = tmp_path / "h"
    for args in (
        ("llm", "engine", "start", MINILM, "-k", "embedding", "--cluster", "127.0.0.1:9"),
        ("llm", "cluster", "status", "--cluster", "127.0.0.1:9"),
    ):
        proc = sage(*args, home=home, env=env)
        assert proc.returncode == 2, proc.stderr
        assert "pip install 'sagellm-cli[ray]'" in proc.stderr


def test_the_management_api_refuses_cluster_engines_unless_allowed(monkeypatch):
    from sagellm_cli.gateway.control.management import Forbidden, spec_from_body

    body = {"model": "m", "kind": "embedding", "cluster": "head:6379"}
    with pytest.raises(Forbidden, match="Ray cluster"):
        spec_from_body(body)
    assert spec_from_body(body, allow_remote_config=True).cluster == "head:6379"
    monkeypatch.setenv("SAGELLM_RAY_ADDRESS", "head:6379")
    with pytest.raises(Forbidden, match="Ray cluster"):
        spec_from_body({"model": "m", "kind": "embedding"})


# --------------------------------------------------------------------------- one engine


@needs_ray
def test_the_cluster_leaves_the_suites_sigterm_handler_in_place(cluster):
    """With the cluster's nodes up, SIGTERM still ends this run through tests/conftest.py
    (fixtures torn down, the cluster shut down), not through Ray's sys.exit."""
    from conftest import _interrupt_on_sigterm

    assert signal.getsignal(signal.SIGTERM) is _interrupt_on_sigterm


@pytest.mark.engines
@needs_st
@needs_ray
def test_engine_start_on_the_cluster_and_cluster_status(cluster, ray_home):
    record = sage_json(
        "llm", "engine", "start", MINILM, "-k", "embedding", "--label", "solo",
        "--cluster", cluster.address, home=ray_home,
    )  # fmt: skip
    names = {_node_name(n) for n in cluster.list_all_nodes()}
    assert record["status"] == "ready" and record["node"] in names
    assert record["spec"]["cluster"] == cluster.address
    # The node's IP is the record's host: the URL routes from anywhere on the network.
    head_ip = cluster.head_node.node_ip_address
    assert record["host"] == head_ip and record["url"] == f"http://{head_ip}:{record['port']}"
    response = httpx.post(
        record["url"] + "/v1/embeddings", json={"model": MINILM, "input": ["x"]}, timeout=60
    )
    assert response.status_code == 200
    # The engine runs in its own process group under its actor (not under this CLI).
    proc = psutil.Process(record["pid"])
    assert os.getpgid(proc.pid) == record["pgid"] and record["pgid"] != os.getpgid(0)

    status = sage_json("llm", "cluster", "status", "--cluster", cluster.address, home=ray_home)
    by_node = {n["node"]: n for n in status["nodes"]}
    assert set(by_node) >= names and all(by_node[n]["alive"] for n in names)
    assert [e["id"] for e in by_node[record["node"]]["engines"]] == [record["id"]]
    assert by_node[record["node"]]["resources"]["CPU"] == 4
    # Without --cluster, the one cluster our engines are on.
    again = sage_json("llm", "cluster", "status", home=ray_home)
    assert again["address"] == cluster.address

    gpus = sage_json("llm", "gpu", "--cluster", cluster.address, home=ray_home)
    assert {n["node"] for n in gpus["nodes"]} == names
    assert all(n["gpus"] == [] and n["nvml"] is False and n["reason"] for n in gpus["nodes"])

    stopped = sage_json("llm", "engine", "stop", "solo", home=ray_home)
    assert stopped[0]["status"] == "stopped"
    wait_for(lambda: not _engine_processes(ray_home, record["id"]), 15, "engine process gone")
    wait_for(lambda: not _named_actors(cluster.address), 30, "no engine actor left")


@needs_ray
@pytest.mark.parametrize("how", ["--cluster", "SAGELLM_RAY_ADDRESS"])
def test_a_cluster_that_does_not_answer_fails_fast(ray_home, how):
    where = ["--cluster", "127.0.0.1:9"] if how == "--cluster" else []
    env = {"SAGELLM_RAY_ADDRESS": "127.0.0.1:9"} if how != "--cluster" else None
    started = time.monotonic()
    proc = sage("llm", "engine", "start", MINILM, "-k", "embedding", *where, home=ray_home, env=env)
    assert proc.returncode == 4, proc.stderr
    assert "does not answer" in proc.stderr and time.monotonic() - started < 30


# --------------------------------------------------------------------------- a preset


PRESET = """\
version: 1
name: ray-emb
engines:
  - name: emb
    kind: embedding
    model: all-MiniLM-L6-v2
    served_model_name: emb
    replicas: 2
    placement: spread
    restart: "no"
    cluster: {address}
"""


@pytest.mark.engines
@needs_st
@needs_ray
def test_preset_across_nodes_node_loss_and_supervision(cluster, ray_home, tmp_path):
    head = cluster.head_node
    worker = next(n for n in cluster.list_all_nodes() if n is not head)
    preset = tmp_path / "ray-emb.yaml"
    preset.write_text(PRESET.format(address=cluster.address))

    dry = sage_json("llm", "preset", "apply", "--file", str(preset), "--dry-run", home=ray_home)
    # Planned without this machine's ports or GPUs: the node gives them at start.
    assert [(e["port"], e["gpus"]) for e in dry["engines"]] == [(None, []), (None, [])]
    assert all("Ray cluster" in " ".join(e["notes"]) for e in dry["engines"])
    applied = sage_json("llm", "preset", "apply", "--file", str(preset), home=ray_home)
    assert applied["ok"] and len(applied["started"]) == 2
    records = [r for r in _records(ray_home).values() if r["preset"] == "ray-emb"]
    assert len(records) == 2 and all(r["status"] == "ready" for r in records)
    # spread: one replica on each node.
    assert {r["node"] for r in records} == {_node_name(head), _node_name(worker)}
    lost = next(r for r in records if r["node"] == _node_name(worker))
    kept = next(r for r in records if r["node"] == _node_name(head))

    with running_gateway(ray_home, *FAST_GATEWAY) as gateway:
        assert set(_embed_through(gateway, "emb", 6)) == {lost["id"], kept["id"]}

        cluster.remove_node(worker, allow_graceful=False)  # as when the machine dies

        def failed():
            current = _records(ray_home)[lost["id"]]
            return current if current["status"] == "failed" else None

        dead = wait_for(failed, 60, "the lost node's engine turns failed")
        assert dead["error"]
        assert _records(ray_home)[kept["id"]]["status"] == "ready"
        # The engine does not outlive its actor: the watchdog stopped it.
        wait_for(lambda: not _engine_processes(ray_home, lost["id"]), 30, "lost engine stopped")
        # Traffic moves to the rest (the gateway drained the dead engine).
        assert set(_embed_through(gateway, "emb", 6)) == {kept["id"]}
        status = sage_json("llm", "cluster", "status", home=ray_home)
        by_node = {n["node"]: n for n in status["nodes"]}
        assert by_node[_node_name(worker)]["alive"] is False
        assert [e["status"] for e in by_node[_node_name(worker)]["engines"]] == ["failed"]

        # Re-applying the preset places the failed replica on the node that remains.
        sage_json("llm", "preset", "apply", "--file", str(preset), home=ray_home)
        records = [r for r in _records(ray_home).values() if r["preset"] == "ray-emb"]
        live = [r for r in records if r["status"] == "ready"]
        assert len(live) == 2 and {r["node"] for r in live} == {_node_name(head)}
        wait_for(
            lambda: len(set(_embed_through(gateway, "emb", 4))) == 2, 30, "both replicas serve"
        )

        # Supervision works through the launcher: a crashed Ray engine is restarted.
        sup = sage_json(
            "llm", "engine", "start", MINILM, "-k", "embedding", "--label", "sup",
            "--restart", "on-failure", "--served-model-name", "sup",
            "--cluster", cluster.address, home=ray_home,
        )  # fmt: skip
        assert sup["node"] == _node_name(head)
        os.kill(sup["pid"], signal.SIGKILL)

        def restarted():
            current = _records(ray_home)[sup["id"]]
            fresh = current["status"] == "ready" and current["pid"] not in (None, sup["pid"])
            return current if fresh else None

        again = wait_for(restarted, 120, "the supervisor restarts the Ray engine")
        assert again["restarts"] == 1 and again["last_exit"] == 128 + signal.SIGKILL
        assert set(_embed_through(gateway, "sup", 2)) == {sup["id"]}

    stopped = sage_json("llm", "engine", "stop", "--all", home=ray_home)
    assert all(r["status"] in ("stopped", "failed") for r in stopped)
    wait_for(lambda: not _engine_processes(ray_home), 30, "no engine process left")
    wait_for(lambda: not _named_actors(cluster.address), 30, "no engine actor left")


# --------------------------------------------------------------------------- GPUs

GPU_SCRIPT = """
import json, os, sys, time
from pathlib import Path
from sagellm_cli.core.errors import ResourceUnavailable
from sagellm_cli.core.launchers.base import launcher_for
from sagellm_cli.core.launchers.ray import RayLauncher, pg_name
from sagellm_cli.core.records import EngineRecord, EngineSpec
from ray.util import get_placement_group

spec = EngineSpec(model="m", kind="llm", use_gpu=True, tensor_parallel=2, cluster=sys.argv[1])
chooser = RayLauncher(spec=spec)
port = chooser.allocate_port("127.0.0.1", [])
placement, cores = chooser.place(spec, "vllm", None, [])
out = {"node": chooser.node, "gpus": placement.gpus, "env": placement.env(), "cores": cores}
try:  # both GPUs are held: a second engine has no room
    other = RayLauncher(spec=spec)
    other.allocate_port("127.0.0.1", [port])
    out["second"] = "placed"
except ResourceUnavailable as exc:
    out["second"] = exc.message
launcher = launcher_for(chooser.node)
log = Path(sys.argv[2])
argv = ["/bin/sh", "-c", 'echo "CVD=$CUDA_VISIBLE_DEVICES"; exec sleep 300']
handle = launcher.spawn("gpu0test", argv, {**placement.env(), "PATH": os.environ["PATH"]}, log)
record = EngineRecord(id="gpu0test", kind="llm", runtime="vllm", model="m",
    served_model_name="m", host=chooser.engine_host(spec), port=port, pid=handle.pid,
    pgid=handle.pgid, pid_create_time=handle.create_time, node=chooser.node, spec=spec)
out["alive"] = launcher.is_alive(record)
time.sleep(0.5)
out["log"] = log.read_text()
out["killed"] = launcher.terminate(record, 5)
out["alive_after"] = launcher.is_alive(record)
try:
    get_placement_group(pg_name(chooser.node, port))
    out["pg_left"] = True
except ValueError:
    out["pg_left"] = False
print(json.dumps(out))
"""


@pytest.mark.engines
@needs_st
@needs_ray
def test_gpu_engines_get_a_placement_group_and_rays_gpu_ids(cluster, ray_home, tmp_path):
    """On a node with two (logical) GPUs: TP 2 takes both through one placement-group
    bundle, the process sees CUDA_VISIBLE_DEVICES=0,1, and stopping frees them."""
    with _our_sigterm():
        gpu_node = cluster.add_node(num_cpus=1, num_gpus=2)
    try:
        cluster.wait_for_nodes()
        env = {**os.environ, "SAGELLM_HOME": str(ray_home)}
        proc = subprocess.run(
            [sys.executable, "-c", GPU_SCRIPT, cluster.address, str(tmp_path / "gpu.log")],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out["node"] == _node_name(gpu_node)
        assert out["gpus"] == [0, 1] and out["cores"] == []
        assert out["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"
        assert "no free 2 GPU(s)" in out["second"]
        assert out["alive"] and "CVD=0,1" in out["log"]
        assert out["alive_after"] is False and out["pg_left"] is False

        gpus = sage_json("llm", "gpu", "--cluster", cluster.address, home=ray_home)
        by_node = {n["node"]: n for n in gpus["nodes"]}
        assert by_node[_node_name(gpu_node)]["ray_gpus"] == 2
    finally:
        cluster.remove_node(gpu_node)
