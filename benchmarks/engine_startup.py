"""Engine start-up: `sage llm engine start` against the same vLLM argv run bare.

Alternating pairs, in the same state of vLLM's cache: a first start (an empty
VLLM_CACHE_ROOT for both: cold, as on a fresh machine) and a warm start (the cache the
first sagellm start filled). The bare run is the exact argv and environment sagellm gave
its engine, with `/health` polled every 50 ms; the sagellm run is the whole CLI call until
it returns (readiness included). Also prints vLLM's own phase timings, from its log.

With --mttr: a warm engine started with `--restart on-failure` under `sage llm serve`,
its API server killed with SIGKILL, and the seconds until it answers /health again
(reaping the orphaned EngineCore, the back-off, the warm start), against the warm start.

    python benchmarks/engine_startup.py [--pairs 2] [--model DIR] [--gpu] [--mttr]

The default model is the tiny Qwen2 of tests/tinymodel.py (CPU build of vLLM). --gpu runs
the engine as on a GPU box (a 6 GiB reservation, vLLM's default compile and CUDA graphs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from harness import free_port

ROOT = Path(__file__).resolve().parent.parent
_TOOK = re.compile(r"\] (.*?took [0-9.]+ ?(?:s|seconds))")


def sage(home: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    full = {**os.environ, **env, "SAGELLM_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "sagellm_cli", *args], env=full,
                          capture_output=True, text=True, timeout=900)  # fmt: skip


ENGINE_ARGS = ["--max-model-len", "512", "--kv-cache-gb", "0.0625"]
GPU_ENGINE_ARGS = ["--max-model-len", "512", "--gpu-memory-gb", "6", "--use-gpu"]


def timed_sage(home: Path, model: str, cache: Path) -> tuple[float, dict, list[str]]:
    began = time.perf_counter()
    out = sage(home, {"VLLM_CACHE_ROOT": str(cache)}, "llm", "engine", "start", model,
               *ENGINE_ARGS, "--json")  # fmt: skip
    took = time.perf_counter() - began
    if out.returncode != 0:
        raise SystemExit(f"engine start failed:\n{out.stderr[-2000:]}")
    record = json.loads(out.stdout)
    env = dict(
        item.split("=", 1)
        for item in Path(f"/proc/{record['pid']}/environ").read_text().split("\0")
        if "=" in item
    )
    phases = _TOOK.findall(Path(record["log_path"]).read_text(errors="replace"))
    sage(home, {}, "llm", "engine", "stop", record["id"])
    return took, {"argv": record["command"], "env": env}, phases


def timed_bare(launch: dict, cache: Path) -> float:
    argv = list(launch["argv"])
    port = free_port()
    argv[argv.index("--port") + 1] = str(port)
    env = {**launch["env"], "VLLM_CACHE_ROOT": str(cache)}
    began = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"bare vLLM exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - began
            except OSError:
                pass
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


def health(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def mttr(home: Path, model: str, cache: Path) -> tuple[float, float]:
    """(warm start s, seconds from kill -9 of the API server to /health answering again)."""
    env = {"VLLM_CACHE_ROOT": str(cache)}
    # The gateway gets none of the caller's cache variables: the restart must use the ones
    # the engine's record pinned at its first start.
    gateway = sage(home, {}, "llm", "serve", "--background", "--port", str(free_port()))
    if gateway.returncode != 0:
        raise SystemExit(f"sage llm serve failed:\n{gateway.stderr[-2000:]}")
    try:
        began = time.perf_counter()
        out = sage(home, env, "llm", "engine", "start", model, *ENGINE_ARGS,
                   "--restart", "on-failure", "--json")  # fmt: skip
        start_s = time.perf_counter() - began
        if out.returncode != 0:
            raise SystemExit(f"engine start failed:\n{out.stderr[-2000:]}")
        record = json.loads(out.stdout)
        os.kill(record["pid"], signal.SIGKILL)
        killed = time.perf_counter()
        while health(record["port"]):  # the port closes with the API server
            time.sleep(0.05)
        while not health(record["port"]):
            if time.perf_counter() - killed > 600:
                raise SystemExit("the engine was not restarted within 600 s")
            time.sleep(0.05)
        took = time.perf_counter() - killed
        sage(home, {}, "llm", "engine", "stop", record["id"])
        return start_s, took
    finally:
        sage(home, {}, "llm", "serve", "--stop")


def main() -> None:
    global ENGINE_ARGS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--model", default=None)
    parser.add_argument("--modes", default="first,warm")
    parser.add_argument("--gpu", action="store_true", help="a GPU engine (6 GiB reserved)")
    parser.add_argument("--mttr", action="store_true", help="also time a kill -9 restart")
    args = parser.parse_args()
    if args.gpu:
        ENGINE_ARGS = GPU_ENGINE_ARGS
    model = args.model
    if model is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from tinymodel import default_tiny_model

        model = str(default_tiny_model())
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "sagellm"
        results: dict[str, dict[str, list[float]]] = {}
        phases: list[str] = []
        launch = None
        for mode in args.modes.split(","):
            results[mode] = {"sage": [], "bare": []}
            warm = Path(tmp) / "cache-first-0-sage"  # filled by the first sagellm start
            if mode == "warm" and not warm.exists():  # fill the warm cache once, unmeasured
                timed_sage(home, model, warm)
            for i in range(args.pairs):
                for who in ("sage", "bare") if i % 2 == 0 else ("bare", "sage"):
                    # First starts: a fresh cache for every run; warm: the cache filled once.
                    name = f"cache-first-{i}-{who}" if mode == "first" else warm.name
                    cache = Path(tmp) / name
                    if who == "sage":
                        took, launch, phases = timed_sage(home, model, cache)
                        results[mode]["sage"].append(took)
                    else:
                        if launch is None:  # the argv comes from a sagellm start
                            _, launch, _ = timed_sage(home, model, Path(tmp) / "cache-probe")
                        results[mode]["bare"].append(timed_bare(launch, cache))
        print("| start | sagellm s (median) | bare s (median) | difference median | worst |")
        print("|---|---|---|---|---|")
        for mode, r in results.items():
            diffs = [s - b for s, b in zip(r["sage"], r["bare"], strict=True)]
            print(f"| {mode} | {statistics.median(r['sage']):.2f} | "
                  f"{statistics.median(r['bare']):.2f} | {statistics.median(diffs):+.2f} | "
                  f"{max(diffs):+.2f} |")  # fmt: skip
        print("\nvLLM's own phases (last sagellm start):")
        for line in phases:
            print("  " + line)
        if args.mttr:
            start_s, took = mttr(home, model, Path(tmp) / "cache-first-0-sage")
            warm_s = statistics.median(results["warm"]["sage"]) if "warm" in results else start_s
            print(
                f"\nMTTR after kill -9 (--restart on-failure, warm cache): {took:.2f}s; "
                f"warm start {warm_s:.2f}s; ratio {took / warm_s:.2f}x (target <= 1.5x)"
            )


if __name__ == "__main__":
    main()
