"""CLI start-up cost: `sage llm engine list --json` against `python -c "import typer"`.

The target is a ratio of at most 1.5. Both commands run alternately, so machine noise hits
both alike. On a shared machine single runs swing by 2x, so the script reports the ratio of
the minimums (the cost with no interference) and the median ratio of back-to-back pairs.

    python benchmarks/cli_startup.py [--runs 30] [--engines 3]

`--engines N` fills the state file with N stopped engine records and N live ones (sleeping
processes standing in for engines, so the reconcile path and the health probe run too).
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
from pathlib import Path


def _time(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def _seed_state(home: Path, count: int) -> list[subprocess.Popen]:
    import psutil

    from sagellm_cli.core.lifecycle import Status
    from sagellm_cli.core.records import EngineRecord

    sleepers, engines = [], {}
    for i in range(count * 2):
        live = i >= count
        proc = None
        if live:
            proc = subprocess.Popen(["sleep", "600"], start_new_session=True)
            sleepers.append(proc)
        rec = EngineRecord(
            id=f"bench{i:03d}",
            kind="llm",
            runtime="vllm",
            model=f"model-{i}",
            served_model_name=f"model-{i}",
            host="127.0.0.1",
            port=20000 + i,
            status=Status.READY if live else Status.STOPPED,
            pid=proc.pid if proc else None,
            pgid=proc.pid if proc else None,
            pid_create_time=psutil.Process(proc.pid).create_time() if proc else None,
            created_at=time.time(),
        )
        engines[rec.id] = rec.to_dict()
    home.mkdir(parents=True, exist_ok=True)
    doc = {"version": 1, "engines": engines, "reservations": {}, "presets": {}, "gateway": None}
    (home / "state.json").write_text(json.dumps(doc))
    return sleepers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--engines", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "sagellm"
        sleepers = _seed_state(home, args.engines)
        # As an installed package runs: with bytecode caches (pip writes them at install).
        # PYTHONDONTWRITEBYTECODE would make every run compile our modules from source;
        # the caches go to a private prefix, not into the source tree.
        env = {**os.environ, "SAGELLM_HOME": str(home), "PYTHONPYCACHEPREFIX": f"{tmp}/pyc"}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        typer_cmd = [sys.executable, "-c", "import typer"]
        list_cmd = [sys.executable, "-m", "sagellm_cli", "llm", "engine", "list", "--json"]
        try:
            for cmd in (typer_cmd, list_cmd):  # warm the page cache
                _time(cmd, env)
            base, ours = [], []
            for _ in range(args.runs):
                base.append(_time(typer_cmd, env))
                ours.append(_time(list_cmd, env))
        finally:
            for proc in sleepers:
                proc.kill()
                proc.wait()
    pair_ratio = statistics.median(o / b for b, o in zip(base, ours, strict=True))
    print("| command | min ms | median ms | p90 ms |")
    print("|---|---|---|---|")
    for name, data in (('python -c "import typer"', base), ("sage llm engine list --json", ours)):
        p90 = statistics.quantiles(data, n=10)[-1]
        print(
            f"| `{name}` | {min(data) * 1000:.0f} | {statistics.median(data) * 1000:.0f} "
            f"| {p90 * 1000:.0f} |"
        )
    print(
        f"\nratio: {min(ours) / min(base):.2f} of the minimums, {pair_ratio:.2f} median of "
        f"back-to-back pairs (target <= 1.5); runs={args.runs}, engines={args.engines * 2}"
    )


if __name__ == "__main__":
    main()
