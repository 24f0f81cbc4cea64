"""Idle unload and wake through `sage llm serve`: what the first request to an unloaded
engine costs, against a normal start of the same engine, and model swapping.

    python benchmarks/supervisor_wake.py [--model DIR] [--cycles 3] [--unload stop|sleep]
    python benchmarks/supervisor_wake.py --swap [--gpu-memory-gb 10 --mock-gpus 1x16]

Default model: the tiny Qwen2 of tests/tinymodel.py (vLLM's CPU build). Everything is
real: a background gateway, real engines, requests over HTTP on 127.0.0.1.

Wake: alternating cycles of (a) `engine start` of a reference engine, timed until it
returns ready, then stopped, and (b) one request to an engine with `keep_alive` 0 that the
supervisor has unloaded (stop) or put to sleep, timed to its answer, minus the same
request to the awake engine. After every cycle the script checks that an unloaded engine
left no process and no GPU reservation behind. With `--unload sleep` (GPU only) it also
reports the engine's GPU memory awake and asleep (NVML, via `sage llm gpu --json`).

Swap (`--swap`): two engines whose reservations don't fit together are asked in turn,
A B A B ..., (1) through the gateway with on-demand swapping (both lazy, keep_alive 0:
each is loaded or woken for its request and unloaded or put to sleep after it), against
(2) keeping them by hand: `engine stop` of one and `engine start` of the other before
each request.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from harness import free_port

ROOT = Path(__file__).resolve().parent.parent


def sage(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "SAGELLM_HOME": str(home)}
    out = subprocess.run([sys.executable, "-m", "sagellm_cli", *args], env=env,
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    if check and out.returncode != 0:
        raise SystemExit(f"sage {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return out


def sage_json(home: Path, *args: str):
    return json.loads(sage(home, *args, "--json").stdout)


def request(url: str, model: str, kind: str) -> float:
    """One request through the gateway; seconds until the whole answer arrived."""
    if kind == "embedding":
        path, body = "/v1/embeddings", {"model": model, "input": ["hello"]}
    else:
        path = "/v1/chat/completions"
        body = {"model": model, "max_tokens": 4,
                "messages": [{"role": "user", "content": "hello"}]}  # fmt: skip
    data = json.dumps(body).encode()
    req = urllib.request.Request(url + path, data, {"Content-Type": "application/json"})
    began = time.perf_counter()
    with urllib.request.urlopen(req, timeout=900) as resp:
        resp.read()
        assert resp.status == 200, resp.status
    return time.perf_counter() - began


def engine(home: Path, label: str) -> dict:
    return next(r for r in sage_json(home, "llm", "engine", "list", "--all") if r["label"] == label)


def wait_status(home: Path, label: str, statuses: tuple[str, ...], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while (record := engine(home, label))["status"] not in statuses:
        if time.monotonic() > deadline:
            raise SystemExit(f"{label} stayed {record['status']}")
        time.sleep(0.2)
    return record


def engine_processes(engine_id: str) -> int:
    count = 0
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if f"SAGELLM_ENGINE_ID={engine_id}".encode() in (proc / "environ").read_bytes():
                    count += 1
            except OSError:
                continue
    return count


def gpu_used_gib(home: Path) -> float | None:
    """NVML: memory used on the GPUs (None on the CPU). The measured engine is alone then."""
    data = sage_json(home, "llm", "gpu")
    if data.get("mock") or not data.get("gpus"):
        return None
    return round(sum(g["memory_used_mib"] for g in data["gpus"]) / 1024, 2)


def reserved(home: Path, engine_id: str) -> bool:
    state = json.loads((home / "state.json").read_text())
    return engine_id in state.get("reservations", {})


def wake_benchmark(home: Path, url: str, args, extra: list[str]) -> None:
    model = args.model
    # keep_alive 5s: unloaded long before the next cycle, awake while its memory is read.
    lazy = sage_json(home, "llm", "engine", "start", model, "--label", "lazy", "--keep-alive",
                     "5s", "--unload", args.unload, *extra)  # fmt: skip
    unloaded = "sleeping" if args.unload == "sleep" else "idle"
    starts, wakes, warm, memory = [], [], [], []
    for cycle in range(args.cycles):
        began = time.perf_counter()
        ref = sage_json(home, "llm", "engine", "start", model, "--label", "ref", *extra)
        starts.append(time.perf_counter() - began)
        sage(home, "llm", "engine", "stop", ref["id"])
        record = wait_status(home, "lazy", (unloaded,))
        asleep = gpu_used_gib(home)
        if args.unload == "stop":
            assert engine_processes(lazy["id"]) == 0, "an unloaded engine left a process"
            assert not reserved(home, lazy["id"]), "an unloaded engine kept its reservation"
        wakes.append(request(url, "lazy", args.kind))
        warm.append(request(url, "lazy", args.kind))
        awake = gpu_used_gib(home)
        memory.append((awake, asleep))
        print(f"cycle {cycle}: start {starts[-1]:.2f}s, first request when {record['status']} "
              f"{wakes[-1]:.2f}s, awake request {warm[-1]:.3f}s", flush=True)  # fmt: skip
    sage(home, "llm", "engine", "stop", lazy["id"])
    assert engine_processes(lazy["id"]) == 0 and not reserved(home, lazy["id"])
    extra_s = [w - a for w, a in zip(wakes, warm, strict=True)]
    over_start = [e - s for e, s in zip(extra_s, starts, strict=True)]
    print(f"\n| unload | `engine start` s (median) | first request to {unloaded} engine s "
          "(median) | its extra latency (median / worst) | extra minus the start (median) "
          "| awake request s |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    print(f"| {args.unload} | {statistics.median(starts):.2f} | {statistics.median(wakes):.2f} | "
          f"{statistics.median(extra_s):.2f} / {max(extra_s):.2f} | "
          f"{statistics.median(over_start):+.2f} | {statistics.median(warm):.3f} |")  # fmt: skip
    if any(a is not None for a, _ in memory):
        print("\nGPU memory used (NVML, the engine alone), awake / unloaded, GiB: "
              + ", ".join(f"{a} / {s}" for a, s in memory))  # fmt: skip


def swap_benchmark(home: Path, url: str, args, extra: list[str]) -> None:
    model, rounds = args.model, args.cycles
    size = ["--gpu-memory-gb", str(args.gpu_memory_gb), "--use-gpu", "--unload", args.unload]
    labels = ("a", "b")
    # (1) on demand: both registered lazily (keep_alive 0); each request loads its engine
    # (or wakes it) and the other is unloaded (or asleep) by then.
    for label in labels:
        sage(home, "llm", "engine", "start", model, "--label", label, "--served-model-name",
             f"model-{label}", "--keep-alive", "0", "--no-wait", *size, *extra)  # fmt: skip
    began = time.perf_counter()
    for i in range(rounds * 2):
        took = request(url, f"model-{labels[i % 2]}", args.kind)
        print(f"on demand: request {i} to {labels[i % 2]}: {took:.2f}s", flush=True)
    on_demand = time.perf_counter() - began
    sage(home, "llm", "engine", "stop", "--all")
    # (2) by hand: stop one, start the other, then the request.
    began = time.perf_counter()
    current = None
    for i in range(rounds * 2):
        label = labels[i % 2]
        if current:
            sage(home, "llm", "engine", "stop", current)
        current = sage_json(home, "llm", "engine", "start", model, "--label", label,
                            "--served-model-name", f"model-{label}", *size, *extra)["id"]  # fmt: skip
        request(url, f"model-{label}", args.kind)
    by_hand = time.perf_counter() - began
    sage(home, "llm", "engine", "stop", "--all")
    print("\n| requests alternating between 2 engines that don't fit together | total s |")
    print("|---|---|")
    print(f"| on demand through the gateway (unload: {args.unload}) | {on_demand:.1f} |")
    print(f"| by hand (`engine stop` + `engine start` before each) | {by_hand:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--kind", default="llm", choices=("llm", "embedding"))
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--unload", default="stop", choices=("stop", "sleep"))
    parser.add_argument("--swap", action="store_true")
    parser.add_argument("--gpu-memory-gb", type=float, default=10.0)
    parser.add_argument("--mock-gpus", default=None, help="e.g. 1x16 (placement only, on CPU)")
    parser.add_argument("--extra", default="", help="more `engine start` options, one string")
    args = parser.parse_args()
    if args.model is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from tinymodel import default_tiny_model

        args.model = str(default_tiny_model())
    if args.mock_gpus:
        os.environ["SAGELLM_MOCK_GPUS"] = args.mock_gpus
    extra = args.extra.split()
    if args.kind == "embedding":
        extra = ["-k", "embedding", *extra]
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "sagellm"
        gateway = sage_json(home, "llm", "serve", "--background", "--port", str(free_port()))
        try:
            if args.swap:
                swap_benchmark(home, gateway["url"], args, extra)
            else:
                wake_benchmark(home, gateway["url"], args, extra)
        finally:
            sage(home, "llm", "engine", "stop", "--all", check=False)
            sage(home, "llm", "serve", "--stop", check=False)


if __name__ == "__main__":
    main()
