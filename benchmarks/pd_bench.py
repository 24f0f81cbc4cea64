"""P/D disaggregation against one engine of the same total memory (docs/routing.md).

Two setups of one model, each behind `sage llm serve`, one after the other:

- `single`: one engine (role general, no connector) with all the memory;
- `pd`: a prefill and a decode engine with a KV connector (NixlConnector), half each;
  the gateway's `pd` path prefills on one (max_tokens 1) and decodes on the other, the KV
  moving over NIXL.

Each setup runs two workloads, streamed to /v1/completions with ignore_eos (exact output
lengths), open loop (Poisson arrivals) with a cap on requests in flight:

- `long`: LONG_IN tokens in / LONG_OUT out (default 4096 / 256);
- `mix`: the same long prompts among short chats (SHORT_IN / SHORT_OUT), a fraction
  `--mix-long` of the requests long: the decode of the short ones is what a long prefill
  stalls on one engine.

Reported per workload (and, for the mix, per kind): TTFT, TPOT, P99 ITL, output
throughput; for `pd` also what the decode engine took over the connector (its
`prompt_tokens_by_source{external_kv_transfer}` and NIXL transfer count).

    python3 benchmarks/pd_bench.py --model /root/m-1b --gpu --gpu-memory-gb 60 --out $OUT
    python3 benchmarks/pd_bench.py --model $SAGELLM_TEST_MODELS/tiny-qwen2 --cpu-small  # CPU

On CPU (`--cpu-small`: the tiny model, 512 in / 32 out) the figures only show that the same
path runs; the CPU is shared by both engines and says nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from harness import T0, all_up, gateway, log, metric, sage
from harness import start_engines as harness_start

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SERVED = "pdbench"


def get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


def start_engines(home: Path, args, setup: str) -> dict[str, dict]:
    """The setup's engines, started at once; {label: record}."""
    memory = ["--gpu-memory-gb"] if args.gpu else ["--no-gpu", "--kv-cache-gb"]
    total = args.gpu_memory_gb if args.gpu else args.kv_cache_gb
    common = ["--served-model-name", SERVED, "--max-model-len", str(args.max_model_len),
              "--env", "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1", "--timeout", "400"]  # fmt: skip
    if setup == "single":
        plans = {"single": ["--role", "general", *memory, f"{total:g}"]}
    else:
        half = f"{total / 2:g}"
        plans = {role: ["--role", role, "--kv-connector", args.connector, *memory, half]
                 for role in ("prefill", "decode")}  # fmt: skip
    return all_up(harness_start(home, {label: [args.model, *common, *extra]
                                       for label, extra in plans.items()}))  # fmt: skip


def dataset(counter, n: int, frac_long: float, args, seed: int):
    """n entries: long ones with probability frac_long, else short; distinct prompts (the
    request number leads, so no two share a cached prefix)."""
    from sagellm_cli.bench.workload import DatasetEntry

    rng = random.Random(seed)
    out = []
    for i in range(n):
        long = rng.random() < frac_long
        n_in, n_out = (args.long_in, args.long_out) if long else (args.short_in, args.short_out)
        text = counter.make_text(n_in - 4, rng)
        out.append(DatasetEntry(prompt=f"{i} {text}", max_tokens=n_out))
    return out


def run_workload(url: str, counter, entries, rate: float, cap: int) -> dict:
    from sagellm_cli.bench.load import BenchRunner, LoadConfig
    from sagellm_cli.bench.metrics import summarize_group
    from sagellm_cli.bench.workload import Workload, WorkloadConfig

    # A random model past its trained positions emits special tokens, which vLLM renders as
    # "" by default: such chunks would carry no text, and so no TTFT or ITL.
    load = LoadConfig(url=url, model=SERVED, endpoint="completions", request_rate=rate,
                      concurrency=cap, num_requests=len(entries), timeout_s=300,
                      extra_body={"skip_special_tokens": False})  # fmt: skip
    result = BenchRunner(load, Workload(WorkloadConfig(dataset=entries), counter)).run()
    records = [r for r in result.records if not r.warmup]
    cut = max(r.input_tokens or 0 for r in records) // 2
    kinds = {"all": records,
             "long": [r for r in records if (r.input_tokens or 0) > cut],
             "short": [r for r in records if (r.input_tokens or 0) <= cut]}  # fmt: skip
    if not (kinds["long"] and kinds["short"]):
        del kinds["long"], kinds["short"]  # one kind: "all" says it
    return {k: summarize_group(v, result.duration_s) for k, v in kinds.items()}


def connector_figures(records: dict[str, dict]) -> dict:
    """What the decode engine took over the connector, and what the prefill engine ran."""
    if "decode" not in records:
        return {}
    dec = get(records["decode"]["url"] + "/metrics")
    pre = get(records["prefill"]["url"] + "/metrics")
    return {
        "decode_prompt_tokens_external": metric(
            dec, "vllm:prompt_tokens_by_source_total", "external_kv_transfer"
        ),
        "decode_prompt_tokens_computed": metric(
            dec, "vllm:prompt_tokens_by_source_total", "local_compute"
        ),
        # vLLM 0.24 may lack the two counters above; this one is older.
        "decode_external_prefix_cache_hits": metric(dec, "vllm:external_prefix_cache_hits_total"),
        "nixl_transfers": metric(dec, "vllm:nixl_xfer_time_seconds_count"),
        "nixl_transfer_s": metric(dec, "vllm:nixl_xfer_time_seconds_sum"),
        "prefill_requests_max_tokens_1": metric(
            pre, "vllm:request_params_max_tokens_bucket", 'le="1.0"'
        ),
    }


def row(name: str, g: dict) -> str:
    def ms(d, key):
        v = d.get(key)
        return f"{v:8.1f}" if isinstance(v, (int, float)) else "       -"

    return (f"{name:<14} {g['ok']:>3}/{g['requests']:<3} ttft p50 {ms(g['ttft_ms'], 'p50')} "
            f"p99 {ms(g['ttft_ms'], 'p99')} | tpot p50 {ms(g['tpot_ms'], 'p50')} | "
            f"itl p99 {ms(g['itl_ms'], 'p99')} | {g['output_throughput']:8.1f} tok/s")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--gpu", action="store_true", help="engines on the GPU (else the CPU)")
    p.add_argument("--gpu-memory-gb", type=float, default=60.0, help="total of each setup")
    p.add_argument("--kv-cache-gb", type=float, default=0.25, help="CPU: total KV of each setup")
    p.add_argument("--connector", default="NixlConnector")
    p.add_argument("--max-model-len", type=int, default=4608)
    p.add_argument("--long-in", type=int, default=4096)
    p.add_argument("--long-out", type=int, default=256)
    p.add_argument("--short-in", type=int, default=256)
    p.add_argument("--short-out", type=int, default=128)
    p.add_argument("--long-n", type=int, default=32, help="requests of the long workload")
    p.add_argument("--mix-n", type=int, default=64, help="requests of the mix")
    p.add_argument("--mix-long", type=float, default=0.25, help="fraction of long in the mix")
    p.add_argument("--long-rate", type=float, default=4.0, help="long: arrivals per second")
    p.add_argument("--mix-rate", type=float, default=8.0, help="mix: arrivals per second")
    p.add_argument("--cap", type=int, default=32, help="requests in flight at most")
    p.add_argument("--setups", default="pd,single")
    p.add_argument(
        "--cpu-small",
        action="store_true",
        help="CPU sizes for the tiny model: 512/32 long, 64/16 short, few requests",
    )
    p.add_argument("--deadline-s", type=float, default=280.0)
    p.add_argument("--out", type=Path, default=None, help="write pd_bench.json here")
    args = p.parse_args(argv)
    # `timeout`'s SIGTERM: unwind, so that each setup's `finally` stops its engines.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.cpu_small:
        args.max_model_len, args.long_in, args.long_out = 1024, 512, 32
        args.short_in, args.short_out, args.long_n, args.mix_n = 64, 16, 6, 12
        args.long_rate, args.mix_rate, args.mix_long = 0.5, 1.0, 0.25
        args.cap = 4 if args.cap == p.get_default("cap") else args.cap
    from sagellm_cli.bench.workload import TokenCounter

    counter = TokenCounter.for_model(args.model)
    long_set = dataset(counter, args.long_n, 1.0, args, seed=1)
    mix_set = dataset(counter, args.mix_n, args.mix_long, args, seed=2)
    results: dict = {"args": vars(args) | {"out": str(args.out)}, "setups": {}}
    for setup in args.setups.split(","):
        if time.monotonic() - T0 > args.deadline_s:
            log(f"{setup}: skipped, past the {args.deadline_s:.0f}s deadline")
            continue
        home = Path(tempfile.mkdtemp(prefix=f"pdbench-{setup}-")) / "sagellm"
        home.mkdir()
        out: dict = {}
        try:
            t = time.monotonic()
            records = start_engines(home, args, setup)
            out["startup_s"] = round(time.monotonic() - t, 1)
            log(f"{setup}: engines {', '.join(records)} ready in {out['startup_s']}s")
            with gateway(home, "--routing", "least_loaded",
                         log_path=home / "gateway.log") as gw:  # fmt: skip
                url = gw.url
                # Warm-up outside the figures: the first requests compile and allocate.
                run_workload(url, counter, dataset(counter, 2, 0.5, args, seed=9), 100, 2)
                for name, entries, rate in (("long", long_set, args.long_rate),
                                            ("mix", mix_set, args.mix_rate)):  # fmt: skip
                    if time.monotonic() - T0 > args.deadline_s:
                        log(f"{setup}/{name}: skipped, past the deadline")
                        continue
                    out[name] = run_workload(url, counter, entries, rate, args.cap)
                    for kind, g in out[name].items():
                        log(row(f"{setup}/{name}/{kind}", g))
            out["connector"] = connector_figures(records)
            if out["connector"]:
                log(f"{setup}: connector {json.dumps(out['connector'])}")
        except Exception as exc:  # noqa: BLE001 - report, stop its engines, go on
            out["error"] = f"{type(exc).__name__}: {exc}"
            log(f"{setup}: FAILED {out['error']}")
        finally:
            sage(home, "engine", "stop", "--all", "--timeout", "20", timeout=120)
        results["setups"][setup] = out
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "pd_bench.json").write_text(json.dumps(results, indent=1))
    failed = any("error" in s for s in results["setups"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
