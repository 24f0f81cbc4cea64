"""Data-plane throughput and tail latency: `vllm bench serve` direct to real vLLM engines
and through `sage llm serve`, alternating, on a GPU machine (scripts/gpu_device_run.sh gwbench).

Engines are started with `sage llm engine start` (tiny model t1, then a second replica t2,
then the 1.2 B model), one at a time (concurrent vLLM starts on one GPU disturb each other's
memory profiling). Each point is direct then gateway, back to back: random 128 in / 64 out,
--ignore-eos, streaming, /v1/completions. A single engine behind the gateway is reached by
its label (t1, b1: the gateway rewrites `model` to the served name); two engines are the
served name `tiny`, balanced round_robin, against both engines driven directly at once
(throughputs summed, the worse P99). The gateway's CPU seconds per point are recorded
(psutil). A failing step is reported and the others go on; a time budget skips the rest.

    python3 benchmarks/gwbench.py --tiny /root/tiny --big /root/m-1b --out $OUT
        [--prompts 2000] [--conc 64,256] [--pair-conc 256] [--budget-s 330]
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
import time
import urllib.request
from pathlib import Path

import psutil
from harness import T0, log, sage

ROOT = Path(__file__).resolve().parent.parent


def start_engine(home: Path, model: str, name: str, label: str, port: int, gb: float) -> bool:
    t = time.monotonic()
    try:
        out = sage(home, "engine", "start", model, "--served-model-name", name, "--label", label,
                   "--port", str(port), "--gpu-memory-gb", str(gb), "--timeout", "240",
                   timeout=280)  # fmt: skip
    except subprocess.TimeoutExpired:
        log(f"engine {label}: start timed out")
        return False
    ok = out.returncode == 0
    log(f"engine {label} ({model}) start rc={out.returncode} in {time.monotonic() - t:.0f}s")
    if not ok:
        print(out.stdout[-1500:], out.stderr[-3000:], sep="\n", flush=True)
    return ok


def wait_http(url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                return True
        time.sleep(0.5)
    return False


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
        sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve",
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
    p.add_argument("--prompts", type=int, default=2000)
    p.add_argument("--conc", default="64,256")
    p.add_argument("--pair-conc", type=int, default=256, help="per engine, two engines")
    p.add_argument("--budget-s", type=float, default=330)
    p.add_argument("--gb", type=float, default=20, help="--gpu-memory-gb per engine")
    args = p.parse_args()
    # A SIGTERM (the step's `timeout`) unwinds through the finally below: nothing is left.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.model_path = {"tiny": args.tiny, "big": args.big}
    out = Path(args.out) / "gwbench"
    out.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="gwbench-home-"))
    concs = [int(c) for c in args.conc.split(",")]
    ports = {"t1": 18101, "t2": 18102, "b1": 18103, "gw": 18889}
    rows: list[tuple[str, int, dict | None, dict | None, float]] = []
    gateway = None

    def point(label: str, name: str, gw_model: str, directs: list[str], conc: int) -> None:
        if time.monotonic() - T0 > args.budget_s:
            log(f"{label} c={conc}: skipped (time budget)")
            rows.append((label, conc, None, None, float("nan")))
            return
        tag = f"{label}-c{conc}".replace(" ", "_")
        n = args.prompts
        cmds = [bench_cmd(args, f"http://127.0.0.1:{ports[d]}", name, conc, n, out,
                          f"{tag}-direct-{d}") for d in directs]  # fmt: skip
        direct = merge(run_benches(cmds, out, [f"{tag}-direct-{d}" for d in directs], 150))
        total = conc * len(directs)
        cmd = bench_cmd(args, f"http://127.0.0.1:{ports['gw']}", gw_model, total,
                        n * len(directs), out, f"{tag}-gateway", model=name)  # fmt: skip
        before = cpu_s(gateway.pid)
        (via,) = run_benches([cmd], out, [f"{tag}-gateway"], 150)
        cpu = (cpu_s(gateway.pid) - before) / (n * len(directs))
        rows.append((label, total, direct, via, cpu))
        log(f"{label} c={total}: direct {direct and round(direct['output_throughput'])} tok/s, "
            f"gateway {via and round(via['output_throughput'])} tok/s, "
            f"gateway CPU {cpu * 1e6:.0f} us/request")  # fmt: skip

    try:
        gateway = subprocess.Popen(
            [sys.executable, "-m", "sagellm_cli", "llm", "serve", "--port", str(ports["gw"])],
            env={**os.environ, "SAGELLM_HOME": str(home)},
            stdout=open(out / "gateway.log", "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if not wait_http(f"http://127.0.0.1:{ports['gw']}/health", 60):
            log("gateway did not start")
            return 1
        if start_engine(home, args.tiny, "tiny", "t1", ports["t1"], args.gb):
            wait_http(f"http://127.0.0.1:{ports['gw']}/ready", 30)
            for c in concs:
                point("tiny, 1 engine", "tiny", "t1", ["t1"], c)
            if start_engine(home, args.tiny, "tiny", "t2", ports["t2"], args.gb):
                time.sleep(2)  # the gateway picks up the new engine within a second
                point("tiny, 2 engines", "tiny", "tiny", ["t1", "t2"], args.pair_conc)
            sage(home, "engine", "stop", "--all", timeout=120)
        if Path(args.big).exists() and start_engine(home, args.big, "big", "b1", ports["b1"],
                                                    args.gb):  # fmt: skip
            for c in concs:
                point("1.2B, 1 engine", "big", "b1", ["b1"], c)
    finally:
        with contextlib.suppress(Exception):
            sage(home, "engine", "stop", "--all", timeout=120)
        if gateway is not None and gateway.poll() is None:
            os.killpg(gateway.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                gateway.wait(15)
            if gateway.poll() is None:
                os.killpg(gateway.pid, signal.SIGKILL)
    table = render(rows)
    print("\n" + table, flush=True)
    (out / "summary.md").write_text(table)
    return 0


def render(rows) -> str:
    lines = [
        "| engines | c | output tok/s direct → gateway (ratio) | P99 TTFT ms direct → gateway "
        "(ratio) | median TPOT ms direct → gateway | failed | gateway CPU/request |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, conc, d, g, cpu in rows:
        if d is None or g is None:
            lines.append(f"| {label} | {conc} | - | - | - | - | (failed or skipped) |")
            continue
        tok = f"{d['output_throughput']:,.0f} → {g['output_throughput']:,.0f} " \
              f"({g['output_throughput'] / d['output_throughput']:.3f}×)"  # fmt: skip
        ttft = f"{d['p99_ttft_ms']:,.0f} → {g['p99_ttft_ms']:,.0f} " \
               f"({g['p99_ttft_ms'] / max(d['p99_ttft_ms'], 1e-9):.2f}×)"  # fmt: skip
        tpot = f"{d['median_tpot_ms']:.2f} → {g['median_tpot_ms']:.2f}"
        failed = f"{d.get('failed', 0) or 0} / {g.get('failed', 0) or 0}"
        lines.append(f"| {label} | {conc} | {tok} | {ttft} | {tpot} | {failed} | "
                     f"{cpu * 1e6:,.0f} µs |")  # fmt: skip
    lines.append("\nTargets: output tok/s ≥ 0.98× direct, P99 TTFT ≤ 1.15× direct.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
