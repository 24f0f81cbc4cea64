"""Multi-model agent sessions on a GPU that holds only two of three models: the cost
scheduler against the old LRU eviction, on one trace (issue 20, item 3).

    python benchmarks/multi_model.py                      # CPU: fake engines, mock GPU
    python benchmarks/multi_model.py --real --model DIR   # GPU: real vLLM sleep mode

The trace: `--sessions` agent sessions at once, each `--rounds` times planner -> a tool
(A or B), every step a burst of 1-3 parallel requests, with think time between steps
(seeded: both policies get the same trace). Reported per policy: swaps (sleeps + wakes,
and cold loads), failed or aborted requests, p50/p99 latency, time spent swapping.

CPU mode: the engines are FAKES (tests/fakes.py SleepyEngine: vLLM's /sleep and /wake_up
with delays of an H200, `--wake-ms`/`--sleep-ms`), recorded with 20 GiB reservations on
one 45 GiB mock GPU (two awake plus one asleep fit), behind the in-process gateway; the
engines only sleep and wake, so there are no cold loads. A request an engine gets
while asleep, or that it was serving when put to sleep, fails (as vLLM's would).

Real mode: `sage llm serve --eviction lru`, then `--eviction cost`, in front of three
vLLM engines of one model (labels planner, tool-a, tool-b) reserving `--gpu-memory-gb`
each with `--unload sleep --keep-alive 15s` (two awake plus one asleep fit on an H200).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import json
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import metric

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
MODELS = ("planner", "tool-a", "tool-b")


@dataclass
class Step:
    at: float  # seconds after the session's previous step ended (think time)
    model: str
    burst: int


def trace(sessions: int, rounds: int, think_s: float, seed: int) -> list[list[Step]]:
    """Per session: planner, tool, planner, tool ... with bursts and think time."""
    rng = random.Random(seed)
    out = []
    for _ in range(sessions):
        steps = []
        for _ in range(rounds):
            steps.append(Step(rng.uniform(0, think_s), "planner", rng.randint(1, 3)))
            tool = rng.choice(MODELS[1:])
            steps.append(Step(rng.uniform(0, think_s), tool, rng.randint(1, 3)))
        out.append(steps)
    return out


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)


async def replay(client, sessions: list[list[Step]], max_tokens: int) -> Result:
    result = Result()

    async def one(model: str) -> None:
        body = {"model": model, "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": "plan the next step"}]}  # fmt: skip
        began = time.perf_counter()
        try:
            response = await client.post("/v1/chat/completions", json=body, timeout=600)
            status = response.status_code
            code = response.json().get("error", {}).get("code") if status != 200 else None
        except Exception as exc:  # noqa: BLE001 - a dropped connection is a failed request
            status, code = 0, type(exc).__name__
        if status == 200:
            result.latencies.append(time.perf_counter() - began)
        else:
            result.failed += 1
            key = f"{status} {code}"
            result.errors[key] = result.errors.get(key, 0) + 1

    async def session(steps: list[Step]) -> None:
        for step in steps:
            await asyncio.sleep(step.at)
            await asyncio.gather(*(one(step.model) for _ in range(step.burst)))

    await asyncio.gather(*(session(s) for s in sessions))
    return result


def summary(policy: str, result: Result, swaps: dict, wall: float) -> dict:
    lat = sorted(result.latencies)
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")  # noqa: E731
    return {
        "policy": policy,
        "requests": len(lat) + result.failed,
        "failed": result.failed,
        "errors": result.errors,
        **swaps,
        "p50_s": round(statistics.median(lat), 3) if lat else None,
        "p99_s": round(p(0.99), 3),
        "wall_s": round(wall, 1),
    }


# -- CPU: fake engines behind the in-process gateway --------------------------


async def cpu_run(policy: str, sessions, args) -> dict:
    from fakes import SleepyEngine
    from test_gateway_support import inprocess_gateway
    from test_lifecycle_races import stand_in

    from sagellm_cli.core.lifecycle import Status

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "sagellm"
        os.environ["SAGELLM_HOME"] = str(home)
        os.environ["SAGELLM_MOCK_GPUS"] = "1x45"
        fakes = [
            SleepyEngine(
                latency=args.latency_ms / 1000,
                sleep_s=args.sleep_ms / 1000,
                wake_s=args.wake_ms / 1000,
                record=False,
            )  # fmt: skip
            for _ in MODELS
        ]
        for fake in fakes:
            fake.start()
        try:
            # planner and tool-a awake, tool-b asleep: the start of every run.
            states = (Status.READY, Status.READY, Status.SLEEPING)
            spec = {"keep_alive": 3600, "unload": "sleep"}
            contexts = [
                stand_in(home, fake, st, engine_id=f"engine{i:04d}", name=name, **spec)
                for i, (fake, st, name) in enumerate(zip(fakes, states, MODELS, strict=True))
            ]
            for ctx in contexts:
                ctx.__enter__()
            try:
                config = {"eviction": policy, "supervise_interval_s": 0.2,
                          "health_interval_s": 0.5, "probe_interval_s": 0,
                          "wake_timeout_s": 120}  # fmt: skip
                async with inprocess_gateway(home / "state.json", **config) as (_, client):
                    began = time.perf_counter()
                    result = await replay(client, sessions, args.max_tokens)
                    wall = time.perf_counter() - began
            finally:
                for ctx in contexts:
                    ctx.__exit__(None, None, None)
        finally:
            for fake in fakes:
                fake.stop()
    sleeps = sum(f.calls.count("/sleep") for f in fakes)
    wakes = sum(f.calls.count("/wake_up") for f in fakes)
    swaps = {"sleeps": sleeps, "wakes": wakes, "cold_loads": 0,
             "swap_s": round(sleeps * args.sleep_ms / 1000 + wakes * args.wake_ms / 1000, 1)}  # fmt: skip
    return summary(policy, result, swaps, wall)


# -- GPU: real vLLM engines behind `sage llm serve` ----------------------------


def sage(home: Path, *args: str, timeout: float = 300) -> str:
    env = {**os.environ, "SAGELLM_HOME": str(home)}
    out = subprocess.run([sys.executable, "-m", "sagellm_cli", *args], env=env,
                         capture_output=True, text=True, timeout=timeout)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"sage {' '.join(args)}: {out.stderr.strip()[-600:]}")
    return out.stdout


def statuses(home: Path) -> dict[str, str]:
    return {
        r["label"]: r["status"] for r in json.loads(sage(home, "llm", "engine", "list", "--json"))
    }


def wait_statuses(home: Path, wanted: dict[str, str], timeout: float) -> None:
    """Wait until every label's status is one of its wanted ones (comma-separated)."""
    deadline = time.monotonic() + timeout
    while True:
        now = statuses(home)  # one `engine list` per look
        if all(now.get(k) in v.split(",") for k, v in wanted.items()):
            return
        if "failed" in now.values():
            raise RuntimeError(f"an engine failed: {now}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"engines stayed {now}, wanted {wanted}")
        time.sleep(0.5)


async def real_run(home: Path, policy: str, sessions, args) -> dict:
    import httpx

    port = str(args.port)
    sage(home, "llm", "serve", "--background", "--port", port, "--eviction", policy)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            began = time.perf_counter()
            result = await replay(client, sessions, args.max_tokens)
            wall = time.perf_counter() - began
            text = (await client.get("/metrics")).text
    finally:
        sage(home, "llm", "serve", "--stop")
    swaps = {"sleeps": int(metric(text, "sagellm_engine_unloads_total")),
             "wakes": int(metric(text, "sagellm_engine_wakes_total")), "cold_loads": 0}  # fmt: skip
    return summary(policy, result, swaps, wall)


class OutOfTime(Exception):
    """--deadline-s ran out (or the outer `timeout` sent SIGTERM): clean up and stop."""


def _out_of_time(signum, frame) -> None:
    raise OutOfTime(signal.Signals(signum).name)


async def real_main(args, sessions) -> list[dict]:
    home = Path(args.home) if args.home else Path(tempfile.mkdtemp()) / "sagellm"
    # The outer `timeout` must never kill us before the engines are stopped: our own
    # deadline comes first, and its SIGTERM also ends in the `finally` below.
    signal.signal(signal.SIGALRM, _out_of_time)
    signal.signal(signal.SIGTERM, _out_of_time)
    signal.alarm(int(args.deadline_s))
    common = ["--gpu-memory-gb", str(args.gpu_memory_gb), "--use-gpu", "--unload", "sleep",
              "--keep-alive", "15s", "--max-model-len", "1024"]  # fmt: skip
    port = str(args.port)
    try:
        # The keep-alive sleeps (two awake, one asleep) need a gateway while engines start.
        sage(home, "llm", "serve", "--background", "--port", port)
        # The first two start at once (they fit; the default concurrent GPU start mode
        # sizes each KV cache from its reservation), the third once they sleep.
        for label in MODELS[:2]:
            sage(home, "llm", "engine", "start", args.model, "--label", label, "--no-wait",
                 "--served-model-name", label, *common, timeout=400)  # fmt: skip
        wait_statuses(home, dict.fromkeys(MODELS[:2], "ready,sleeping"), 300)
        print(f"started {MODELS[0]} and {MODELS[1]}", flush=True)
        wait_statuses(home, dict.fromkeys(MODELS[:2], "sleeping"), 60)
        sage(home, "llm", "engine", "start", args.model, "--label", MODELS[2],
             "--served-model-name", MODELS[2], *common, timeout=400)  # fmt: skip
        sage(home, "llm", "serve", "--stop")
        results = []
        for policy in ("lru", "cost"):
            results.append(await real_run(home, policy, sessions, args))
            print(json.dumps(results[-1]), flush=True)
        return results
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the clean-up itself is not cut short
        env = {**os.environ, "SAGELLM_HOME": str(home)}
        for stop in (["serve", "--stop"], ["engine", "stop", "--all"]):
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run([sys.executable, "-m", "sagellm_cli", "llm", *stop], env=env,
                               capture_output=True, timeout=20)  # fmt: skip


def table(results: list[dict]) -> str:
    rows = ["| eviction | requests | failed | sleeps | wakes | cold loads | swapping s | "
            "p50 s | p99 s | wall s |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        rows.append(f"| {r['policy']} | {r['requests']} | {r['failed']} | {r['sleeps']} | "
                    f"{r['wakes']} | {r['cold_loads']} | {r.get('swap_s', '-')} | {r['p50_s']} | "
                    f"{r['p99_s']} | {r['wall_s']} |")  # fmt: skip
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="real vLLM engines on a GPU")
    parser.add_argument("--model", default=None, help="--real: the model directory")
    parser.add_argument("--gpu-memory-gb", type=float, default=60.0)
    parser.add_argument("--port", type=int, default=18731)
    parser.add_argument("--home", default=None, help="--real: SAGELLM_HOME (default: a temp dir)")
    parser.add_argument("--deadline-s", type=float, default=230.0,
                        help="--real: stop everything after this long (inside the outer timeout)")  # fmt: skip
    parser.add_argument("--sessions", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--think-s", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--latency-ms", type=float, default=300.0, help="CPU: fake answer time")
    parser.add_argument("--wake-ms", type=float, default=400.0, help="CPU: fake wake time")
    parser.add_argument("--sleep-ms", type=float, default=800.0, help="CPU: fake sleep time")
    parser.add_argument("--policies", default="lru,cost", help="which, in this order")
    parser.add_argument("--decisions", default=None,
                        help="CPU: write every eviction decision (scores, queues) to this file")  # fmt: skip
    args = parser.parse_args()
    if args.decisions:
        handler = logging.FileHandler(args.decisions, mode="w")
        handler.setFormatter(logging.Formatter("%(relativeCreated)8.0f ms %(message)s"))
        decisions = logging.getLogger("sagellm.gateway.scheduler")
        decisions.addHandler(handler)
        decisions.setLevel(logging.INFO)
        decisions.propagate = False
    faulthandler.dump_traceback_later(900, exit=True)  # a hang shows where, then exits
    sessions = trace(args.sessions, args.rounds, args.think_s, args.seed)
    requests = sum(s.burst for steps in sessions for s in steps)
    if args.real:
        if not args.model:
            raise SystemExit("--real needs --model DIR")
        print(f"real vLLM engines ({args.model}), {requests} requests per policy", flush=True)
        results = asyncio.run(real_main(args, sessions))
    else:
        print(f"CPU mode: FAKE engines that honour sleep/wake (wake {args.wake_ms:.0f} ms, "
              f"sleep {args.sleep_ms:.0f} ms), mock GPU 1x45 GiB, three 20 GiB models; "
              f"{requests} requests per policy", flush=True)  # fmt: skip
        results = [asyncio.run(cpu_run(p, sessions, args)) for p in args.policies.split(",")]
    print(table(results))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
