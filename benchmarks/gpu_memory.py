"""Preset convergence on one GPU: apply time against the slowest engine alone, and each
engine's NVML memory against its reservation, per start mode (issue 21).

The preset: three chat engines (6, 10, 14 GiB), a vLLM pooling embedding engine (4 GiB) and
our sentence-transformers embedding server (MiniLM, estimated), all pinned to GPU 0. For
each mode in --modes (SAGELLM_GPU_START_MODE: concurrent, pipeline, serial) it runs one
`preset apply`, after a first (cold) apply that fills vLLM's compile cache and the 14 GiB
chat and the embedding engine each alone, with the same argv.
Prints per engine: reserved, NVML used, difference, within max(5 %, 0.5 GiB), the KV bytes
sagellm gave vLLM, and vLLM's own "Graph capturing ... took X GiB" / "Model loading took".

    python benchmarks/gpu_memory.py [--model DIR] [--sizes 6,10,14] [--embed-gib 4]
                                    [--modes concurrent,pipeline] [--no-st] [--alone chat,embed]

Needs NVML and vLLM (see scripts/gpu_device_run.sh); the default model is the tiny Qwen2
of tests/tinymodel.py, built on the spot.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024**2
_VLLM_GIB = re.compile(r"(Model loading took [0-9.]+ GiB|Graph capturing finished in .*GiB)")


def sage(home: Path, *args: str, env: dict[str, str] | None = None, check=True) -> str:
    full = {**os.environ, "SAGELLM_HOME": str(home), "SAGELLM_DISABLE_NVML": "0", **(env or {})}
    out = subprocess.run([sys.executable, "-m", "sagellm_cli", *args], env=full,
                         capture_output=True, text=True, timeout=1500)  # fmt: skip
    if out.returncode != 0 and check:
        # The root cause sits above the log tail: every error line of every engine log.
        causes = subprocess.run(["grep", "-rhE", "Error|error:|assert", str(home / "logs")],
                                capture_output=True, text=True).stdout  # fmt: skip
        raise RuntimeError(f"sage {' '.join(args)} failed:\n{out.stderr[-1500:]}\n{causes[-3000:]}")
    return out.stdout


def engine_mib(pgid: int) -> int:
    """NVML's memory of every process in the group, straight from pynvml."""
    import psutil
    import pynvml

    pids = set()
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid:
                pids.add(proc.pid)
        except OSError:
            continue
    pynvml.nvmlInit()
    try:
        total = 0
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if p.pid in pids:
                    total += (p.usedGpuMemory or 0) // MIB
        return total
    finally:
        pynvml.nvmlShutdown()


def engines_yaml(model: str, sizes: list[float], embed_gib: float, st: bool) -> str:
    chat = "".join(
        f"  - name: chat{i}\n    kind: llm\n    model: {model}\n    gpus: [0]\n"
        f"    gpu_memory_gb: {gib}\n    max_model_len: 512\n"
        for i, gib in enumerate(sizes)
    )
    if embed_gib:
        chat += (f"  - name: embed\n    kind: embedding\n    runtime: vllm\n    model: {model}\n"
                 f"    gpus: [0]\n    gpu_memory_gb: {embed_gib}\n    max_model_len: 512\n"
                 "    use_gpu: true\n")  # fmt: skip
    if st:
        chat += ("  - name: minilm\n    kind: embedding\n    model: all-MiniLM-L6-v2\n"
                 "    gpus: [0]\n    use_gpu: true\n")  # fmt: skip
    return chat


def apply(model: str, engines: str, mode: str, tag: str) -> tuple[float, list[dict]]:
    home = Path(tempfile.mkdtemp(prefix=f"sagellm-converge-{tag}-")) / "sagellm"
    home.mkdir(parents=True)
    preset = home.parent / "bench.yaml"
    preset.write_text(f"version: 1\nname: bench\nengines:\n{engines}")
    env = {"SAGELLM_GPU_START_MODE": mode}
    began = time.monotonic()
    try:
        result = json.loads(sage(home, "llm", "preset", "apply", "--file", str(preset),
                                 "--json", env=env))  # fmt: skip
        took = time.monotonic() - began
        ledger = json.loads(sage(home, "llm", "gpu", "--json", env=env))
        over = {r["engine_id"]: r.get("over_gib") for r in ledger.get("reservations", [])}
        rows = []
        for record in result["started"]:
            reserved = record["gpu_memory_gb"]
            used = engine_mib(record["pgid"]) / 1024
            argv = record["command"]
            kv = argv[argv.index("--kv-cache-memory-bytes") + 1] if (
                "--kv-cache-memory-bytes" in argv) else "profiled"  # fmt: skip
            log = Path(record["log_path"]).read_text(errors="replace")
            rows.append({
                "engine": record["label"] or record["id"], "runtime": record["runtime"],
                "reserved_gib": reserved, "used_gib": round(used, 2),
                "diff_gib": round(used - reserved, 2),
                "within": abs(used - reserved) <= max(0.05 * reserved, 0.5),
                "kv_bytes": kv, "ledger_over_gib": over.get(record["id"]),
                "vllm": "; ".join(_VLLM_GIB.findall(log)[-2:]),
                "ready_s": round(record["ready_at"] - record["created_at"], 1),
            })  # fmt: skip
        return took, rows
    finally:
        sage(home, "llm", "preset", "down", "bench", env=env, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--sizes", default="6,10,14")
    parser.add_argument("--embed-gib", type=float, default=4.0)
    parser.add_argument("--no-st", action="store_true", help="leave out the MiniLM server")
    parser.add_argument("--modes", default="concurrent,pipeline")
    parser.add_argument("--alone", default="chat,embed",
                        help="which engines also start alone (chat: the largest chat engine; "
                        "embed: the vLLM pooling one); empty for none")  # fmt: skip
    args = parser.parse_args()
    model = args.model
    if model is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from tinymodel import default_tiny_model

        model = str(default_tiny_model())
    sizes = [float(x) for x in args.sizes.split(",")]
    engines = engines_yaml(model, sizes, args.embed_gib, not args.no_st)
    # A first apply fills vLLM's compile cache for every engine config (reported as cold);
    # then each config alone, warm, and the modes, warm: like for like.
    runs: list[tuple[str, str, str]] = [("cold", "concurrent", engines)]
    alone_runs = set(filter(None, args.alone.split(",")))
    if "chat" in alone_runs:
        runs.append(("alone chat", "concurrent", engines_yaml(model, [max(sizes)], 0, False)))
    if "embed" in alone_runs and args.embed_gib:
        runs.append(("alone embed", "concurrent", engines_yaml(model, [], args.embed_gib,
                                                               False)))  # fmt: skip
    runs += [(mode, mode, engines) for mode in args.modes.split(",")]
    alone: dict[str, float] = {}
    for name, mode, yaml in runs:
        try:
            took, rows = apply(model, yaml, mode, name.replace(" ", "-"))
        except RuntimeError as exc:
            print(f"\n{name} ({mode}): FAILED {exc}")
            continue
        if name.startswith("alone"):
            alone[name] = took
            print(f"{name}: up in {took:.1f}s")
            continue
        slowest = max(alone.values()) if alone else None
        ratio = f", {took / slowest:.2f}x the slowest engine alone" if slowest else ""
        print(f"\n{name} (SAGELLM_GPU_START_MODE={mode}): preset up in {took:.1f}s{ratio}")
        print("| engine | runtime | reserved GiB | NVML GiB | diff | within | ready s | "
              "KV bytes | ledger over | vLLM |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['engine']} | {r['runtime']} | {r['reserved_gib']:.2f} | "
                  f"{r['used_gib']:.2f} | {r['diff_gib']:+.2f} | "
                  f"{'yes' if r['within'] else 'NO'} | {r['ready_s']} | {r['kv_bytes']} | "
                  f"{r['ledger_over_gib']} | {r['vllm']} |")  # fmt: skip


if __name__ == "__main__":
    main()
