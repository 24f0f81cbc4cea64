"""Memory per engine against its reservation, with three engines started together on one GPU.

Runs the same preset twice on a real GPU with real vLLM: engines on one GPU loading one at
a time (sagellm's default), and all at once (SAGELLM_SERIAL_GPU_STARTS=0, what happened
before). Prints NVML's per-process figure beside each reservation.

    python benchmarks/gpu_memory.py [--model DIR] [--sizes 6,10,14]

Needs NVML and vLLM (see scripts/gpu_device_run.sh); the default model is the tiny Qwen2
of tests/tinymodel.py, built on the spot.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024**2


def sage(home: Path, *args: str, env: dict[str, str] | None = None) -> str:
    full = {**os.environ, "SAGELLM_HOME": str(home), "SAGELLM_DISABLE_NVML": "0", **(env or {})}
    out = subprocess.run([sys.executable, "-m", "sagellm_cli", *args], env=full,
                         capture_output=True, text=True, timeout=1500)  # fmt: skip
    if out.returncode != 0:
        # The root cause sits above the log tail: every error line of every engine log.
        causes = subprocess.run(["grep", "-rhE", "Error|error:|assert", str(home / "logs")],
                                capture_output=True, text=True).stdout  # fmt: skip
        raise SystemExit(f"sage {' '.join(args)} failed:\n{out.stderr[-1500:]}\n{causes[-3000:]}")
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


def run(model: str, sizes: list[float], serial: bool) -> list[dict]:
    home = Path(tempfile.mkdtemp(prefix="sagellm-gpu-bench-")) / "sagellm"
    home.mkdir(parents=True)
    engines = "".join(
        f"  - name: e{i}\n    kind: llm\n    model: {model}\n    served_model_name: e{i}\n"
        f"    gpus: [0]\n    gpu_memory_gb: {gib}\n    max_model_len: 512\n"
        "    extra_args: [--max-num-seqs, '32']\n"
        for i, gib in enumerate(sizes)
    )
    preset = home.parent / "bench.yaml"
    preset.write_text(f"version: 1\nname: bench\nengines:\n{engines}")
    env = {"SAGELLM_SERIAL_GPU_STARTS": "1" if serial else "0"}
    began = time.monotonic()
    try:
        result = json.loads(sage(home, "llm", "preset", "apply", "--file", str(preset),
                                 "--json", env=env))  # fmt: skip
        took = time.monotonic() - began
        rows = []
        for record, gib in zip(result["started"], sizes, strict=True):
            used = engine_mib(record["pgid"]) / 1024
            rows.append({"engine": record["id"], "reserved_gib": gib, "used_gib": round(used, 2),
                         "diff_gib": round(used - gib, 2), "up_s": round(took, 1)})  # fmt: skip
        return rows
    finally:
        sage(home, "llm", "preset", "down", "bench", env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--sizes", default="6,10,14")
    parser.add_argument("--modes", default="concurrent,serial")
    args = parser.parse_args()
    model = args.model
    if model is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from tinymodel import default_tiny_model

        model = str(default_tiny_model())
    sizes = [float(x) for x in args.sizes.split(",")]
    print("mode        engine    reserved GiB  NVML used GiB  difference  preset up after")
    for mode in args.modes.split(","):
        for row in run(model, sizes, mode == "serial"):
            print(f"{mode:10}  {row['engine']}  {row['reserved_gib']:12.2f}  "
                  f"{row['used_gib']:13.2f}  {row['diff_gib']:+10.2f}  {row['up_s']:8.0f}s")  # fmt: skip


if __name__ == "__main__":
    main()
