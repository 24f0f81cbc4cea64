"""Gateway overhead: latency added (p50/p99), max requests/s and CPU per request.

Every system forwards to the same fast fake OpenAI upstream
(benchmarks/fake_upstream.py, the one place a fake belongs: it answers at once,
so what is measured is the proxy's own cost). For each scenario (plain chat and
16-chunk SSE streaming, at concurrency 1 and 64) direct-to-upstream is measured
right before each proxy, in the same run, and "added" is proxy minus direct.

Systems: `sage llm serve` with each upstream client (native, the default; aiohttp
and httpx for the comparison), and, where they are installed, the peers vllm-router and smg (Rust
routers) and the LiteLLM proxy. Peers are looked up on PATH and in --peers-bin.

    python benchmarks/gateway_overhead.py [--duration 2] [--rounds 1]
        [--peers-bin /tmp/peers/bin] [--markdown docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHAT = b'{"model":"fake","messages":[{"role":"user","content":"hello"}],"max_tokens":16}'
STREAM = (
    b'{"model":"fake","messages":[{"role":"user","content":"hello"}],"max_tokens":16,"stream":true}'
)
SCENARIOS = [("chat", 1), ("chat", 64), ("stream", 1), ("stream", 64)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as resp:
            if resp.status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} not up after {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def spawn(argv: list[str], env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        argv,
        env={**os.environ, **(env or {})},
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


# -- load generation ---------------------------------------------------------


@dataclass
class Result:
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    cpu_s: float | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        data = sorted(self.latencies)
        return data[min(len(data) - 1, int(q * len(data)))] * 1000

    @property
    def cpu_us_per_req(self) -> float | None:
        if self.cpu_s is None or not self.requests:
            return None
        return self.cpu_s / self.requests * 1e6


async def _load(url: str, body: bytes, stream: bool, concurrency: int, seconds: float) -> Result:
    result = Result()
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    headers = {"Content-Type": "application/json", "Authorization": "Bearer bench"}
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> None:
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    if stream:
                        async for _ in resp.content.iter_any():
                            pass
                    else:
                        await resp.read()
                    ok = resp.status == 200
            except aiohttp.ClientError:
                ok = False
            if ok:
                result.latencies.append(time.perf_counter() - t0)
            else:
                result.errors += 1

        async def worker(deadline: float) -> None:
            while time.perf_counter() < deadline:
                await one()

        warm = time.perf_counter() + min(0.5, seconds / 4)
        await asyncio.gather(*(worker(warm) for _ in range(concurrency)))
        result.latencies.clear()
        result.errors = 0
        start = time.perf_counter()
        await asyncio.gather(*(worker(start + seconds) for _ in range(concurrency)))
        result.seconds = time.perf_counter() - start
    result.requests = len(result.latencies)
    return result


def _cpu(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def measure(url: str, scenario: str, concurrency: int, seconds: float, pid: int | None) -> Result:
    body, stream = (STREAM, True) if scenario == "stream" else (CHAT, False)
    before = _cpu(pid)
    result = asyncio.run(_load(url, body, stream, concurrency, seconds))
    after = _cpu(pid)
    if before is not None and after is not None:
        result.cpu_s = after - before  # includes the warm-up, divided over measured requests
    return result


# -- systems -------------------------------------------------------------------


@dataclass
class System:
    name: str
    start: Callable[[int, Path], tuple[str, subprocess.Popen]]


def _sagellm(upstream_client: str) -> Callable:
    def start(upstream_port: int, work: Path) -> tuple[str, subprocess.Popen]:
        from sagellm_cli.core.models import EngineRecord
        from sagellm_cli.core.state import StateStore

        home = work / f"home-{upstream_client}"
        fake_pid = int((work / "upstream.pid").read_text())
        with StateStore(home / "state.json").transaction() as state:
            state.engines["fake0001"] = EngineRecord(
                id="fake0001",
                kind="llm",
                runtime="vllm",
                model="fake",
                served_model_name="fake",
                host="127.0.0.1",
                port=upstream_port,
                status="ready",
                pid=fake_pid,
                pid_create_time=psutil.Process(fake_pid).create_time(),
                created_at=time.time(),
            )
        port = free_port()
        proc = spawn(
            [sys.executable, "-m", "sagellm_cli", "llm", "serve", "--port", str(port),
             "--upstream-client", upstream_client],
            env={"SAGELLM_HOME": str(home), "PYTHONPATH": str(ROOT)},
            log=work / f"sagellm-{upstream_client}.log",
        )  # fmt: skip
        wait_http(f"http://127.0.0.1:{port}/ready", proc)
        return f"http://127.0.0.1:{port}", proc

    return start


def _rust_router(binary: str, extra: list[str]) -> Callable:
    def start(upstream_port: int, work: Path) -> tuple[str, subprocess.Popen]:
        port = free_port()
        proc = spawn(
            [binary, *extra, "--host", "127.0.0.1", "--port", str(port),
             "--worker-urls", f"http://127.0.0.1:{upstream_port}", "--policy", "round_robin",
             "--prometheus-port", str(free_port())],
            log=work / f"{Path(binary).name}.log",
        )  # fmt: skip
        wait_http(f"http://127.0.0.1:{port}/health", proc)
        return f"http://127.0.0.1:{port}", proc

    return start


def _litellm(binary: str) -> Callable:
    def start(upstream_port: int, work: Path) -> tuple[str, subprocess.Popen]:
        config = work / "litellm.yaml"
        config.write_text(
            "model_list:\n"
            "  - model_name: fake\n"
            "    litellm_params:\n"
            "      model: openai/fake\n"
            f"      api_base: http://127.0.0.1:{upstream_port}/v1\n"
            "      api_key: unused\n"
            "litellm_settings:\n"
            "  telemetry: false\n"
        )
        port = free_port()
        proc = spawn(
            [binary, "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
             "--num_workers", "1"],
            env={"LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"},
            log=work / "litellm.log",
        )  # fmt: skip
        wait_http(f"http://127.0.0.1:{port}/health/liveliness", proc, timeout=180)
        return f"http://127.0.0.1:{port}", proc

    return start


def find(binary: str, peers_bin: str | None) -> str | None:
    if peers_bin and (Path(peers_bin) / binary).exists():
        return str(Path(peers_bin) / binary)
    return shutil.which(binary)


def systems(peers_bin: str | None, skip_peers: bool) -> tuple[list[System], list[str]]:
    found = [
        System("sagellm (native upstream)", _sagellm("native")),
        System("sagellm (aiohttp upstream)", _sagellm("aiohttp")),
        System("sagellm (httpx upstream)", _sagellm("httpx")),
    ]
    missing = []
    if skip_peers:
        return found, ["peers skipped"]
    for name, binary, extra in (("vllm-router", "vllm-router", []), ("smg", "smg", ["launch"])):
        path = find(binary, peers_bin)
        if path:
            found.append(System(name, _rust_router(path, extra)))
        else:
            missing.append(f"{name}: not installed")
    path = find("litellm", peers_bin)
    if path:
        found.append(System("LiteLLM proxy (1 worker)", _litellm(path)))
    else:
        missing.append("LiteLLM: not installed")
    return found, missing


# -- main ------------------------------------------------------------------------


def run(args) -> str:
    work = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    upstream_port = free_port()
    upstream = spawn(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "fake_upstream.py"),
            "--port",
            str(upstream_port),
        ],
        log=work / "upstream.log",
    )
    (work / "upstream.pid").write_text(str(upstream.pid))
    direct_url = f"http://127.0.0.1:{upstream_port}"
    rows: dict[tuple[str, str, int], list[tuple[Result, Result]]] = {}
    chosen, missing = systems(args.peers_bin, args.skip_peers)
    if args.only:
        chosen = [s for s in chosen if args.only in s.name]
    try:
        wait_http(direct_url + "/health", upstream)
        for _ in range(args.rounds):
            for system in chosen:
                try:
                    url, proc = system.start(upstream_port, work)
                except Exception as exc:  # noqa: BLE001 - a peer that fails is reported, not fatal
                    missing.append(f"{system.name}: failed to start ({exc})")
                    continue
                try:
                    for scenario, conc in SCENARIOS:
                        seconds = args.duration * (1.5 if conc > 1 else 1)
                        direct = measure(
                            direct_url + "/v1/chat/completions", scenario, conc, seconds, None
                        )
                        proxied = measure(
                            url + "/v1/chat/completions", scenario, conc, seconds, proc.pid
                        )
                        rows.setdefault((system.name, scenario, conc), []).append((direct, proxied))
                        print(
                            f"{system.name:28s} {scenario:6s} c={conc:<3d} "
                            f"direct p50 {direct.pct(0.5):6.2f} ms {direct.rps:7.0f} rps | "
                            f"proxy p50 {proxied.pct(0.5):6.2f} p99 {proxied.pct(0.99):7.2f} ms "
                            f"{proxied.rps:7.0f} rps err {proxied.errors} "
                            f"cpu/req {proxied.cpu_us_per_req or 0:6.0f} us",
                            flush=True,
                        )
                finally:
                    stop(proc)
    finally:
        stop(upstream)
    return render(rows, chosen, missing, args)


def _median(values: list[float]) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def render(rows, chosen, missing, args) -> str:
    lines = [
        "| system | chat c=1 added p50 / p99 | chat c=64 req/s (direct) | "
        "stream c=1 added p50 / p99 | stream c=64 req/s (direct) | CPU/req at c=64 chat / stream |",
        "|---|---|---|---|---|---|",
    ]
    for system in chosen:
        cells = [system.name]
        cpu = []
        for scenario, conc in SCENARIOS:
            pairs = rows.get((system.name, scenario, conc))
            if not pairs:
                cells.append("-")
                continue
            if conc == 1:
                p50 = _median([p.pct(0.5) - d.pct(0.5) for d, p in pairs])
                p99 = _median([p.pct(0.99) - d.pct(0.99) for d, p in pairs])
                cells.append(f"{p50:+.2f} ms / {p99:+.2f} ms")
            else:
                rps = _median([p.rps for _, p in pairs])
                direct = _median([d.rps for d, _ in pairs])
                errors = sum(p.errors for _, p in pairs)
                cells.append(
                    f"{rps:,.0f} ({direct:,.0f})" + (f", {errors} errors" if errors else "")
                )
                cpu.append(_median([p.cpu_us_per_req for _, p in pairs]))
        cells.append(" / ".join(f"{c:,.0f} µs" for c in cpu) if cpu else "-")
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPUs, "
        f"{args.rounds} round(s), {args.duration:.1f} s per point at c=1 "
        f"({args.duration * 1.5:.1f} s at c=64); medians over rounds.",
    ]
    if missing:
        notes.append("Not measured: " + "; ".join(missing) + ".")
    return "\n".join(lines + notes) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per point at c=1")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--peers-bin", default=os.environ.get("SAGELLM_PEERS_BIN"))
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--only", default=None, help="substring filter on system names")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    table = run(args)
    print()
    print(table)


if __name__ == "__main__":
    main()
