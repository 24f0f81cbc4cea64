"""Gateway overhead: latency added (p50/p99), max requests/s and CPU per request.

Every system forwards to the same fast fake OpenAI upstream
(benchmarks/fake_upstream.py, the one place a fake belongs: it answers at once,
so what is measured is the proxy's own cost). All systems are started first and
then measured in turn, interleaved: for each round and scenario (plain chat and
16-chunk SSE streaming, at concurrency 1 and 64) direct-to-upstream is measured
before and after the systems, whose order rotates from round to round. "added" is
proxy minus direct (the mean of the two direct runs around it); CPU per request is
the CPU time of the proxy's process tree during the measured window only.

Systems: our gateway (`--gateways CLIENT/SERVER,...`; by default the shipped
client under uvicorn), run by this script with the gateway's own app and server
code (`--serve-gateway`, below), and, where they are installed, the peers
vllm-router and smg (Rust routers) and the LiteLLM proxy, looked up on PATH and in
--peers-bin. `--candidates` adds every upstream client and server that was
compared when the gateway's client was chosen (benchmarks/upstream_candidates.py;
needs `pip install aiosonic pyreqwest granian`).

    python benchmarks/gateway_overhead.py [--duration 1] [--rounds 3]
        [--peers-bin /tmp/peers/bin] [--candidates] [--gateways aiohttp/granian]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
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
from harness import free_port, loop_lag, scrape

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHAT = b'{"model":"fake","messages":[{"role":"user","content":"hello"}],"max_tokens":16}'
STREAM = (
    b'{"model":"fake","messages":[{"role":"user","content":"hello"}],"max_tokens":16,"stream":true}'
)
# Paced: 16 chunks 2 ms apart, with a usage chunk, as a real engine streams. The fake's
# back-to-back chunks coalesce into one or two reads, which hides any per-chunk cost.
PACED = (
    b'{"model":"fake","messages":[{"role":"user","content":"hello"}],"max_tokens":16,'
    b'"stream":true,"stream_options":{"include_usage":true},"fake_itl_ms":2}'
)
BODIES = {"chat": (CHAT, False), "stream": (STREAM, True), "paced": (PACED, True)}
SCENARIOS = [("chat", 1), ("chat", 64), ("stream", 1), ("stream", 64), ("paced", 64)]


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


async def _load(
    url: str, body: bytes, stream: bool, concurrency: int, seconds: float, pid: int | None
) -> Result:
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
        # CPU is read around the measured window only (the warm-up is left out).
        before = _cpu(pid)
        start = time.perf_counter()
        await asyncio.gather(*(worker(start + seconds) for _ in range(concurrency)))
        result.seconds = time.perf_counter() - start
        after = _cpu(pid)
    if before is not None and after is not None:
        result.cpu_s = after - before
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
    body, stream = BODIES[scenario]
    return asyncio.run(_load(url, body, stream, concurrency, seconds, pid))


# -- many concurrent streams ---------------------------------------------------------


@dataclass
class StreamsResult:
    streams: int
    completed: int = 0
    errors: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    base_rss_mb: float = 0.0
    cpu_s: float | None = None
    first_error: str = ""
    ttfts: list[float] = field(default_factory=list, repr=False)
    lag: dict = field(default_factory=dict)

    def ttft_ms(self, q: float) -> float:
        """The q-quantile of the time to the first chunk, as the client saw it."""
        if not self.ttfts:
            return float("nan")
        data = sorted(self.ttfts)
        return data[min(len(data) - 1, int(q * len(data)))] * 1000


def _rss_mb(pid: int) -> float:
    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in (proc, *proc.children(recursive=True))) / 2**20
    except psutil.Error:
        return 0.0


async def _streams(
    url: str, pid: int | None, streams: int, waves: int, itl_ms: float, metrics: str | None
):
    """`streams` paced streams at once, `waves` times over: errors, the proxy's peak RSS,
    each stream's time to its first chunk and (our gateway, `metrics`) its event-loop lag."""
    body = PACED.replace(b'"fake_itl_ms":2', b'"fake_itl_ms":%g' % itl_ms)
    out = StreamsResult(streams)
    if pid is not None:
        out.base_rss_mb = out.peak_rss_mb = _rss_mb(pid)
    connector = aiohttp.TCPConnector(limit=streams, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    headers = {"Content-Type": "application/json", "Authorization": "Bearer bench"}
    done = False

    async def sample() -> None:
        while not done and pid is not None:
            out.peak_rss_mb = max(out.peak_rss_mb, _rss_mb(pid))
            await asyncio.sleep(0.1)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one() -> None:
            try:
                sent = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as resp:
                    pieces = []
                    async for piece in resp.content.iter_any():
                        if not pieces:
                            out.ttfts.append(time.perf_counter() - sent)
                        pieces.append(piece)
                    data = b"".join(pieces)
                    if resp.status != 200 or not data.endswith(b"data: [DONE]\n\n"):
                        raise RuntimeError(f"status {resp.status}, {data[-80:]!r}")
                    out.completed += 1
            except Exception as exc:  # noqa: BLE001 - counted and reported
                out.errors += 1
                out.first_error = out.first_error or f"{type(exc).__name__}: {exc}"[:200]

        sampler = asyncio.ensure_future(sample())
        lag_before = scrape(metrics) if metrics else ""
        before = _cpu(pid)
        start = time.perf_counter()
        for _ in range(waves):
            await asyncio.gather(*(one() for _ in range(streams)))
        out.seconds = time.perf_counter() - start
        after = _cpu(pid)
        if metrics:
            out.lag = loop_lag(lag_before, scrape(metrics))
        done = True
        await sampler
    if before is not None and after is not None:
        out.cpu_s = after - before
    return out


def run_streams(args) -> str:
    """Every system through `args.streams` concurrent streams; a Markdown table."""
    work = Path(tempfile.mkdtemp(prefix="gw-streams-"))
    upstream_port = free_port()
    upstream = spawn(
        [sys.executable, str(ROOT / "benchmarks" / "fake_upstream.py"), "--port",
         str(upstream_port)],
        log=work / "upstream.log",
    )  # fmt: skip
    (work / "upstream.pid").write_text(str(upstream.pid))
    chosen, missing = systems(args)
    if args.only:
        chosen = [s for s in chosen if args.only in s.name]
    rows = []
    try:
        wait_http(f"http://127.0.0.1:{upstream_port}/health", upstream)
        direct = asyncio.run(
            _streams(f"http://127.0.0.1:{upstream_port}/v1/chat/completions", upstream.pid,
                     args.streams, args.waves, args.itl_ms, None)
        )  # fmt: skip
        rows.append(("direct (the fake upstream itself)", direct))
        for system in chosen:
            try:
                url, proc = system.start(upstream_port, work)
            except Exception as exc:  # noqa: BLE001
                missing.append(f"{system.name}: failed to start ({exc})")
                continue
            try:
                res = asyncio.run(
                    _streams(url + "/v1/chat/completions", proc.pid, args.streams, args.waves,
                             args.itl_ms, url + "/metrics")
                )  # fmt: skip
            finally:
                stop(proc)
            rows.append((system.name, res))
            print(f"  {system.name}: {res}", flush=True)
    finally:
        stop(upstream)
    lines = [
        "| system | streams at once × waves | completed | errors | wall s | "
        "RSS before → peak | CPU/stream | first chunk p50 / p99 | loop lag mean, share ≥ 10 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        cpu = f"{r.cpu_s / max(1, r.completed) * 1e6:,.0f} µs" if r.cpu_s is not None else "-"
        lines.append(
            f"| {name} | {r.streams} × {args.waves} | {r.completed} | {r.errors} | "
            f"{r.seconds:.1f} | {r.base_rss_mb:.0f} → {r.peak_rss_mb:.0f} MB | {cpu} | "
            f"{r.ttft_ms(0.5):.0f} / {r.ttft_ms(0.99):.0f} ms | "
            + (f"{r.lag['lag_mean_ms']:.1f} ms, {r.lag['lag_over_10ms']:.0%} |" if r.lag else "- |")
        )
    errors = [f"{n}: {r.first_error}" for n, r in rows if r.first_error]
    notes = [
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPUs: each stream is 16 "
        f"chunks {args.itl_ms:g} ms apart plus a usage chunk and [DONE].",
    ]
    if errors:
        notes.append("First errors: " + "; ".join(errors) + ".")
    if missing:
        notes.append("Not measured: " + "; ".join(missing) + ".")
    return "\n".join(lines + notes) + "\n"


# -- our gateway, run by this script ----------------------------------------------

# What `--candidates` compares: upstream client / server. "native" is the gateway's own
# client; the others are in upstream_candidates.py ("aiohttp" with its fast paths,
# "aiohttp-plain" as the gateway used it before).
CANDIDATE_GATEWAYS = [
    "native/uvicorn",
    "aiohttp/uvicorn",
    "aiohttp-plain/uvicorn",
    "aiosonic/uvicorn",
    "pyreqwest/uvicorn",
    "aiohttp/granian",
    "native/granian",
    "pyreqwest/granian",
]


def _upstream_factory(client: str) -> Callable:
    """The upstream class for a client name: the gateway's own (native), else a candidate."""
    if client == "native":
        from sagellm_cli.gateway.http.native import NativeUpstream

        return NativeUpstream
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from upstream_candidates import CANDIDATES

    return CANDIDATES[client]


def serve_gateway(client: str, server: str, port: int) -> None:
    """Serve the gateway app (SAGELLM_HOME's engines) with this upstream client and server.

    uvicorn: `gateway.http.server.serve`, exactly what `sage llm serve` runs in the foreground.
    granian: the same ASGI app (lifespan included) under granian's embedded server.
    """
    from sagellm_cli.gateway.config import GatewayConfig
    from sagellm_cli.gateway.http import app as app_module

    factory = _upstream_factory(client)
    config = GatewayConfig(host="127.0.0.1", port=port)
    app_module.NativeUpstream = lambda connect_timeout: factory(connect_timeout)
    if server == "uvicorn":
        from sagellm_cli.gateway.http.server import serve

        serve(config)
        return
    from granian.constants import HTTPModes, Interfaces
    from granian.server.embed import Server

    gateway = app_module.create_app(config)
    granian = Server(
        gateway,
        address="127.0.0.1",
        port=port,
        interface=Interfaces.ASGI,
        http=HTTPModes.http1,
        websockets=False,
        backlog=2048,
        log_enabled=False,
    )
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(granian.serve())


# -- systems -------------------------------------------------------------------


@dataclass
class System:
    name: str
    start: Callable[[int, Path], tuple[str, subprocess.Popen]]


def _sagellm(spec: str, root: Path = ROOT) -> Callable:
    """Our gateway with this CLIENT/SERVER, from the checkout at `root` (before/after runs)."""
    client, _, server = spec.partition("/")
    server = server or "uvicorn"

    def start(upstream_port: int, work: Path) -> tuple[str, subprocess.Popen]:
        from sagellm_cli.core.lifecycle import Status
        from sagellm_cli.core.records import EngineRecord
        from sagellm_cli.core.state import StateStore

        tag = f"{client}-{server}" + ("" if root == ROOT else f"-{root.name}")
        home = work / f"home-{tag}"
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
                status=Status.READY,
                pid=fake_pid,
                pid_create_time=psutil.Process(fake_pid).create_time(),
                created_at=time.time(),
            )
        port = free_port()
        proc = spawn(
            [sys.executable, str(root / "benchmarks" / "gateway_overhead.py"), "--serve-gateway",
             "--client", client, "--server", server, "--port", str(port)],
            env={"SAGELLM_HOME": str(home), "PYTHONPATH": str(root)},
            log=work / f"sagellm-{tag}.log",
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


def systems(args) -> tuple[list[System], list[str]]:
    specs = list(CANDIDATE_GATEWAYS) if args.candidates else []
    for spec in (args.gateways or "native/uvicorn").split(","):
        if spec and spec not in specs:
            specs.append(spec)
    found = [System(f"sagellm {spec.replace('/', ' + ')}", _sagellm(spec)) for spec in specs]
    if args.compare_root:  # the same gateway from another checkout, e.g. before a change
        root = Path(args.compare_root).resolve()
        found.append(System(f"sagellm @ {root}", _sagellm("native/uvicorn", root)))
    missing = []
    if args.skip_peers:
        return found, ["peers skipped"]
    for name, binary, extra in (("vllm-router", "vllm-router", []), ("smg", "smg", ["launch"])):
        path = find(binary, args.peers_bin)
        if path:
            found.append(System(name, _rust_router(path, extra)))
        else:
            missing.append(f"{name}: not installed")
    path = find("litellm", args.peers_bin)
    if path:
        found.append(System("LiteLLM proxy (1 worker)", _litellm(path)))
    else:
        missing.append("LiteLLM: not installed")
    return found, missing


# -- main ------------------------------------------------------------------------

Rows = dict[tuple[str, str, int], list[tuple[float, Result]]]  # (direct p50 ms, proxied)


def scenarios(args) -> list[tuple[str, int]]:
    """The scenarios to measure: all, or those named by --scenarios (chat, stream, paced)."""
    if not args.scenarios:
        return SCENARIOS
    wanted = set(args.scenarios.split(","))
    return [(sc, c) for sc, c in SCENARIOS if sc in wanted]


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
    direct_url = f"http://127.0.0.1:{upstream_port}/v1/chat/completions"
    rows: Rows = {}
    directs: dict[tuple[str, int], list[Result]] = {}
    chosen, missing = systems(args)
    if args.only:
        chosen = [s for s in chosen if args.only in s.name]
    running: list[tuple[System, str, subprocess.Popen]] = []
    try:
        wait_http(f"http://127.0.0.1:{upstream_port}/health", upstream)
        for system in chosen:
            try:
                url, proc = system.start(upstream_port, work)
            except Exception as exc:  # noqa: BLE001 - a peer that fails is reported, not fatal
                missing.append(f"{system.name}: failed to start ({exc})")
                continue
            running.append((system, url + "/v1/chat/completions", proc))
        for rnd in range(args.rounds):
            shift = rnd % len(running) if running else 0
            order = running[shift:] + running[:shift]
            for scenario, conc in scenarios(args):
                seconds = args.duration * (1.5 if conc > 1 else 1)
                before = measure(direct_url, scenario, conc, seconds, None)
                results = [
                    (system, measure(url, scenario, conc, seconds, proc.pid))
                    for system, url, proc in order
                ]
                after = measure(direct_url, scenario, conc, seconds, None)
                directs.setdefault((scenario, conc), []).extend((before, after))
                direct_p50 = (before.pct(0.5) + after.pct(0.5)) / 2
                direct_rps = (before.rps + after.rps) / 2
                print(
                    f"round {rnd + 1} {scenario:6s} c={conc:<3d} direct p50 {direct_p50:6.2f} ms "
                    f"{direct_rps:7.0f} rps",
                    flush=True,
                )
                for system, proxied in results:
                    rows.setdefault((system.name, scenario, conc), []).append((direct_p50, proxied))
                    print(
                        f"  {system.name:34s} added p50 {proxied.pct(0.5) - direct_p50:+6.2f} ms "
                        f"p99 {proxied.pct(0.99):7.2f} ms {proxied.rps:7.0f} rps "
                        f"err {proxied.errors} cpu/req {proxied.cpu_us_per_req or 0:6.0f} us",
                        flush=True,
                    )
    finally:
        for _, _, proc in running:
            stop(proc)
        stop(upstream)
    return render(rows, directs, [s for s, _, _ in running], missing, args)


def _median(values: list[float | None]) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def _spread(values: list[float | None], fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    med = format(statistics.median(values), fmt)
    if len(values) == 1:
        return med
    return f"{med} ({format(min(values), fmt)}…{format(max(values), fmt)})"


def render(rows: Rows, directs, chosen: list[System], missing: list[str], args) -> str:
    """Markdown: medians over rounds with (min…max); CPU also as a ratio to vllm-router's."""
    ref = "vllm-router"
    lines = [
        "| system | chat added p50, c=1 / c=64 | stream added p50, c=1 / c=64 | "
        "req/s at c=64, chat / stream / paced | CPU/req c=64 chat | CPU/req c=64 stream | "
        f"CPU/req c=64 paced | CPU ÷ {ref}'s, chat / stream / paced |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cpu_ratios(name: str, scenario: str) -> list[float]:
        mine = rows.get((name, scenario, 64), [])
        theirs = rows.get((ref, scenario, 64), [])
        return [
            p.cpu_us_per_req / q.cpu_us_per_req
            for (_, p), (_, q) in zip(mine, theirs, strict=False)
            if p.cpu_us_per_req and q.cpu_us_per_req
        ]

    names = {s.name for s in chosen}
    for system in chosen:
        name = system.name
        cells = [name]
        for scenario in ("chat", "stream"):
            added = [
                _median([p.pct(0.5) - d for d, p in rows.get((name, scenario, conc), [])])
                for conc in (1, 64)
            ]
            cells.append(" / ".join(f"{a:+.2f}" for a in added) + " ms")
        rps, errors = [], 0
        for scenario in ("chat", "stream", "paced"):
            pairs = rows.get((name, scenario, 64), [])
            errors += sum(p.errors for _, p in pairs)
            rps.append(f"{_median([p.rps for _, p in pairs]):,.0f}")
        cells.append(" / ".join(rps) + (f", {errors} errors" if errors else ""))
        for scenario in ("chat", "stream", "paced"):
            pairs = rows.get((name, scenario, 64), [])
            cells.append(_spread([p.cpu_us_per_req for _, p in pairs], ",.0f") + " µs")
        ratios = [_median(cpu_ratios(name, sc)) for sc in ("chat", "stream", "paced")]
        cells.append(" / ".join(f"{r:.2f}×" for r in ratios) if ref in names else "-")
        lines.append("| " + " | ".join(cells) + " |")
    direct = [
        f"{sc} c={c}: {_median([r.pct(0.5) for r in directs.get((sc, c), [])]):.2f} ms p50, "
        f"{_median([r.rps for r in directs.get((sc, c), [])]):,.0f} req/s"
        for sc, c in scenarios(args)
    ]
    notes = [
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPUs, "
        f"{args.rounds} round(s), {args.duration:.1f} s per point at c=1 "
        f"({args.duration * 1.5:.1f} s at c=64); medians over rounds, CPU with (min…max); "
        f"the CPU ratio is the median of per-round ratios.",
        "Direct to the upstream: " + "; ".join(direct) + ".",
    ]
    if missing:
        notes.append("Not measured: " + "; ".join(missing) + ".")
    return "\n".join(lines + notes) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=1.0, help="seconds per point at c=1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peers-bin", default=os.environ.get("SAGELLM_PEERS_BIN"))
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--only", default=None, help="substring filter on system names")
    parser.add_argument(
        "--gateways",
        default=None,
        help="our gateway as CLIENT/SERVER pairs, comma-separated (default: native/uvicorn)",
    )
    parser.add_argument(
        "--candidates", action="store_true", help="add every client/server that was compared"
    )
    parser.add_argument(
        "--compare-root", default=None, help="also run the gateway of this checkout (before/after)"
    )
    parser.add_argument("--scenarios", default=None, help="comma-separated: chat,stream,paced")
    parser.add_argument(
        "--streams", type=int, default=0, help="instead: this many concurrent paced streams"
    )
    parser.add_argument("--waves", type=int, default=3, help="--streams: times over")
    parser.add_argument("--itl-ms", type=float, default=50.0, help="--streams: chunk spacing")
    # Internal: what each gateway system runs.
    parser.add_argument("--serve-gateway", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", default="native", help=argparse.SUPPRESS)
    parser.add_argument("--server", default="uvicorn", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_gateway:
        serve_gateway(args.client, args.server, args.port)
        return
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    table = run_streams(args) if args.streams else run(args)
    print()
    print(table)


if __name__ == "__main__":
    main()
