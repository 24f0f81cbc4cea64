"""Prefix-cache routing: round_robin vs prefix (characters) vs kv (vLLM's KV events), on a
prefix-repetition trace and on a hot-prefix trace (issue 24, item 1; docs/routing.md).

    python benchmarks/kv_routing.py                  # CPU: the tiny model, small trace
    python benchmarks/kv_routing.py --gpu --model /root/m-1b   # H200 (gpu_device_run.sh kvroute)

Two real vLLM engines of one model are started with `--kv-events` (served name `m`), then
for each routing a fresh `sage llm serve --routing R` in front of them runs the trace with
our own async client (streamed completions: TTFT is the first content chunk). Each run uses
prefixes of its own (a new seed), so no run profits from an earlier run's cache.

The prefix-repetition trace is vLLM's `prefix_repetition` dataset's shape: `--prefixes`
random prefixes of `--prefix-len` tokens, each request one of them (uniformly) plus a random
`--suffix-len`-token suffix, `--requests` requests at concurrency `--concurrency`. The hot
trace sends `--hot` of the requests to one prefix.

Reported per run: the engines' prefix-cache hit rate (vllm:prefix_cache_hits / _queries,
summed over both, for the run's own requests), req/s, P50/P99 TTFT, and how many requests
each engine served (x-sagellm-engine).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import httpx
from harness import T0, all_up, gateway, log, sage
from harness import start_engines as harness_start

ROOT = Path(__file__).resolve().parent.parent
NAME = "m"
ROUTINGS = ("round_robin", "prefix", "kv")


def start_engines(home: Path, args) -> list[dict]:
    """Two engines of `args.model`, with KV events, started in parallel."""
    common = [args.model, "--served-model-name", NAME, "--kv-events", "--timeout", "400"]
    if args.gpu:
        common += ["--gpu-memory-gb", str(args.gpu_memory_gb)]
        if args.blocks:
            common += [f"--extra-arg=--num-gpu-blocks-override={args.blocks}"]
    else:
        common += ["--max-model-len", str(args.max_model_len), "--kv-cache-gb", str(args.kv_gb)]
    return list(all_up(harness_start(home, {f"r{i}": common for i in (1, 2)})).values())


def prefix_cache(url: str) -> tuple[float, float]:
    """(hits, queries) in tokens from an engine's /metrics (vLLM V1's counter names)."""
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    values = {"hits": 0.0, "queries": 0.0}
    for line in text.splitlines():
        m = re.match(
            r"vllm:(?:gpu_)?prefix_cache_(hits|queries)(?:_total)?\{[^}]*\} ([0-9.e+]+)$", line
        )
        if m:
            values[m.group(1)] += float(m.group(2))
    return values["hits"], values["queries"]


def make_trace(tokenizer, args, seed: int, hot: float) -> list[str]:
    """Prompts: a prefix (a hot one with probability `hot`) plus a fresh suffix, as text."""
    rng = random.Random(seed)
    vocab = [
        i for i in range(min(tokenizer.vocab_size, 30000)) if i not in tokenizer.all_special_ids
    ]

    def text(n: int) -> str:
        return tokenizer.decode([rng.choice(vocab) for _ in range(n)])

    prefixes = [text(args.prefix_len) for _ in range(args.prefixes)]
    prompts = []
    for _ in range(args.requests):
        p = 0 if rng.random() < hot else rng.randrange(args.prefixes)
        prompts.append(prefixes[p] + " " + text(args.suffix_len))
    return prompts


async def run_trace(base: str, prompts: list[str], args) -> dict:
    """Send the prompts at `args.concurrency`; TTFT per request and the engine that served."""
    ttfts: list[float] = []
    engines: dict[str, int] = {}
    errors = 0
    queue = list(reversed(prompts))
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def worker() -> None:
            nonlocal errors
            while queue:
                prompt = queue.pop()
                body = {"model": NAME, "prompt": prompt, "max_tokens": args.output_len,
                        "stream": True, "ignore_eos": True, "temperature": 0}  # fmt: skip
                t = time.perf_counter()
                first = None
                try:
                    async with client.stream("POST", base + "/v1/completions", json=body) as r:
                        if r.status_code != 200:
                            errors += 1
                            await r.aread()
                            continue
                        engine = r.headers.get("x-sagellm-engine", "?")
                        async for line in r.aiter_lines():
                            if first is None and line.startswith("data: {"):
                                first = time.perf_counter() - t
                except httpx.HTTPError:
                    errors += 1
                    continue
                engines[engine] = engines.get(engine, 0) + 1
                ttfts.append(first if first is not None else time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.perf_counter() - t0
    ttfts.sort()

    def pct(q: float) -> float:
        return ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] * 1000 if ttfts else float("nan")

    return {"ok": len(ttfts), "errors": errors, "wall_s": round(wall, 2),
            "req_s": round(len(ttfts) / wall, 3), "ttft_p50_ms": round(pct(0.5), 1),
            "ttft_p99_ms": round(pct(0.99), 1), "engines": engines}  # fmt: skip


def one_run(home: Path, engines: list[dict], name: str, prompts: list[str], args) -> dict:
    """A fresh gateway with routing `name` in front of the engines; the trace through it.
    `kv@F` is `kv` with `--kv-sticky-load-factor F`."""
    routing, _, sticky = name.partition("@")
    extra = ["--kv-sticky-load-factor", sticky] if sticky else []
    logs = home.parent / f"gateway-{routing}-{time.time_ns()}.log"  # one per run
    with gateway(home, "--routing", routing, *extra, *args.gateway_args.split(),
                 log_path=logs) as gw:  # fmt: skip
        base = gw.url
        deadline = time.monotonic() + 60
        if routing == "kv":  # the subscribers connect, the tokenizer loads (in a thread)
            while time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    text = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
                    if re.search(r"sagellm_gateway_kv_tokenizer_loaded\{[^}]*\} 1", text):
                        break
                time.sleep(0.3)
            else:
                log("kv: the gateway did not load the tokenizer within 60 s")
        time.sleep(1.0)  # ZMQ drops what is published before a subscriber has joined
        before = [prefix_cache(e["url"]) for e in engines]
        result = asyncio.run(run_trace(base, prompts, args))
        time.sleep(1.0)  # the engines' last steps reach their counters
        after = [prefix_cache(e["url"]) for e in engines]
        if routing == "kv":
            with contextlib.suppress(OSError):
                text = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
                routed = dict(
                    re.findall(r'sagellm_gateway_kv_routed_blocks\{kind="(\w+)"\} (\S+)', text)
                )
                if float(routed.get("routed", 0)):
                    expected = float(routed["expected_hit"]) / float(routed["routed"])
                    result["kv_expected_block_hit"] = round(expected, 3)
                result["kv_blocks"] = {
                    m.group(1): float(m.group(2))
                    for m in re.finditer(
                        r'sagellm_gateway_kv_cached_blocks\{engine="([^"]+)"[^}]*\} (\S+)', text
                    )
                }
    hits = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    queries = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    result["hit_rate"] = round(hits / queries, 3) if queries else None
    return {"routing": name, **result}


def main() -> int:
    """Parse options, start the engines, run every trace x routing, print a table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="the H200 form (defaults of the issue)")
    p.add_argument("--model", default=None, help="model dir (CPU default: the tiny test model)")
    p.add_argument("--routings", help="comma-separated; kv@F: kv with sticky factor F")
    p.add_argument("--rounds", type=int, default=1, help="alternations of the routings")
    p.add_argument("--prefixes", type=int)
    p.add_argument("--prefix-len", type=int)
    p.add_argument("--suffix-len", type=int)
    p.add_argument("--requests", type=int)
    p.add_argument("--hot-requests", type=int, help="requests of the hot trace (0: skip it)")
    p.add_argument("--concurrency", type=int)
    p.add_argument("--output-len", type=int)
    p.add_argument("--hot", type=float, default=0.5, help="hot trace: share of the hot prefix")
    p.add_argument("--blocks", type=int, default=2048, help="GPU: KV blocks per engine")
    p.add_argument("--gpu-memory-gb", type=float, default=20)
    p.add_argument("--kv-gb", type=float, default=0.0037, help="CPU: KV cache per engine, GiB")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--gateway-args", default="", help="more `sage llm serve` options")
    p.add_argument("--deadline-s", type=float, default=0, help="skip runs past this (0: none)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    gpu = dict(prefixes=96, prefix_len=512, suffix_len=64, requests=1536, hot_requests=512,
               concurrency=32, output_len=32)  # fmt: skip
    cpu = dict(prefixes=12, prefix_len=256, suffix_len=32, requests=96, hot_requests=48,
               concurrency=4, output_len=4)  # fmt: skip
    gpu["routings"] = "round_robin,prefix,kv,kv@1.25"  # kv@1.25: kv without stickiness
    cpu["routings"] = ",".join(ROUTINGS)
    for key, value in (gpu if args.gpu else cpu).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.model is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from tinymodel import default_tiny_model

        args.model = str(default_tiny_model())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)

    def stop(signum, frame):  # `timeout`'s SIGTERM: still stop the engines (finally below)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    home = Path(tempfile.mkdtemp(prefix="kvroute-")) / "sagellm"
    home.mkdir(parents=True)
    results = []
    try:
        log(f"starting two engines of {args.model} in {home}")
        engines = start_engines(home, args)
        log("engines ready: " + ", ".join(f"{e['id']} kv:{e['kv_events_port']}" for e in engines))
        traces = {"prefix_repetition": (0.0, args.requests), "hot": (args.hot, args.hot_requests)}
        names = [t for t in traces if traces[t][1]]
        routings = args.routings.split(",")
        plan = [(t, r) for t in names for _ in range(args.rounds) for r in routings]
        if args.gpu:  # what the targets need first, in case the deadline comes
            first = {("prefix_repetition", r) for r in ROUTINGS} | {
                ("hot", "prefix"),
                ("hot", "kv"),
            }
            plan.sort(key=lambda item: item not in first)  # a stable sort: order kept within
        for seed, (trace, routing) in enumerate(plan, 1):
            if args.deadline_s and time.monotonic() - T0 > args.deadline_s:
                log(f"deadline: skipping {trace}/{routing}")
                continue
            hot, n = traces[trace]
            trace_args = argparse.Namespace(**{**vars(args), "requests": n})
            prompts = make_trace(tokenizer, trace_args, seed, hot)
            row = {"trace": trace, **one_run(home, engines, routing, prompts, args)}
            log(json.dumps(row))
            results.append(row)
    except RuntimeError as exc:  # an engine or a gateway did not come up: said, then stopped
        log(f"FAILED: {exc}")
        return 1
    finally:
        sage(home, "engine", "stop", "--all", timeout=120)
    print("\n| trace | routing | hit rate | req/s | TTFT p50 ms | TTFT p99 ms | per engine |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        split = "/".join(str(v) for _, v in sorted(r["engines"].items()))
        print(f"| {r['trace']} | {r['routing']} | {r['hit_rate']} | {r['req_s']} | "
              f"{r['ttft_p50_ms']} | {r['ttft_p99_ms']} | {split} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
