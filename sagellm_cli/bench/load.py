"""When requests are sent and how each one is timed (asyncio + aiohttp).

- Closed loop (`concurrency`): C workers, each sends its next request as soon as
  its previous one ends.
- Open loop (`request_rate`): arrivals at gamma-distributed gaps with mean
  1/rate; shape `burstiness` = 1 is a Poisson process, < 1 burstier, > 1 more
  regular (as `vllm bench serve` does). `concurrency` then caps requests in
  flight; a request's clock starts when it is sent, not while it waits for the cap.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sagellm_cli.bench.metrics import RequestRecord, measured_duration, summarize
from sagellm_cli.bench.workload import BenchRequest, Workload
from sagellm_cli.core import protocol
from sagellm_cli.core.errors import BadInput, OperationFailed

ENDPOINTS = {
    "chat": protocol.v1_relative(protocol.CHAT),
    "completions": protocol.v1_relative(protocol.COMPLETIONS),
    "embeddings": protocol.v1_relative(protocol.EMBEDDINGS),
}
RESULT_VERSION = 1


def base_url(url: str) -> str:
    """`http://h:p`, `http://h:p/`, `http://h:p/v1/` -> `http://h:p/v1`."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise BadInput(
            f"--url {url!r} is not an http(s) URL", hint="e.g. --url http://127.0.0.1:8000"
        )
    return protocol.api_base(url)


def detect_model(url: str, api_key: str | None = None, timeout: float = 10.0) -> str:
    """The first model id of the server's `/v1/models` (for a missing --model)."""
    import httpx

    headers = protocol.bearer(api_key)
    target = base_url(url) + protocol.v1_relative(protocol.MODELS)
    hint = "pass --model NAME"
    try:
        resp = httpx.get(target, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise OperationFailed(
            f"can't reach {target}: {exc}", hint="is the server up? check --url"
        ) from None
    if resp.status_code != 200:
        raise OperationFailed(f"{target} answered HTTP {resp.status_code}", hint=hint)
    try:
        models = [m["id"] for m in resp.json().get("data", [])]
    except (ValueError, KeyError, TypeError, AttributeError):
        models = []
    if not models:
        raise OperationFailed(f"{target} lists no models", hint=hint)
    return models[0]


@dataclass
class LoadConfig:
    """Target and load pattern of one run."""

    url: str
    model: str
    endpoint: str = "chat"
    api_key: str | None = None
    stream: bool = True
    concurrency: int | None = None
    request_rate: float | None = None
    burstiness: float = 1.0
    num_requests: int | None = None
    duration_s: float | None = None
    warmup: int = 0
    seed: int = 0
    timeout_s: float = 600.0
    ignore_eos: bool = True
    priority_body: bool = False
    extra_body: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """BadInput on any inconsistent option (before anything is sent)."""
        if self.endpoint not in ENDPOINTS:
            raise BadInput(
                f"unknown endpoint {self.endpoint!r}",
                hint="use --endpoint chat|completions|embeddings",
            )
        self.url = base_url(self.url)
        if not self.model:
            raise BadInput("no model given", hint="pass --model NAME as the server knows it")
        if self.concurrency is not None and self.concurrency < 1:
            raise BadInput("--concurrency must be >= 1")
        if self.request_rate is not None and not self.request_rate > 0:
            raise BadInput("--request-rate must be > 0 (inf sends everything at once)")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise BadInput("--burstiness must be a positive number (1 = Poisson)")
        if self.num_requests is not None and self.duration_s is not None:
            raise BadInput("--num-requests and --duration both given", hint="pass one of them")
        if self.num_requests is not None and self.num_requests < 1:
            raise BadInput("--num-requests must be >= 1")
        if self.duration_s is not None and not self.duration_s > 0:
            raise BadInput("--duration must be > 0 seconds")
        if self.num_requests is None and self.duration_s is None:
            self.num_requests = 100
        if self.request_rate is None and self.concurrency is None:
            self.concurrency = 1
        if self.warmup < 0:
            raise BadInput("--warmup must be >= 0")

    @property
    def mode(self) -> str:
        return "open" if self.request_rate is not None else "closed"

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly form for the result file (the API key left out)."""
        return {
            "url": self.url,
            "model": self.model,
            "endpoint": self.endpoint,
            "stream": self.stream and self.endpoint != "embeddings",
            "mode": self.mode,
            "concurrency": self.concurrency,
            "request_rate": self.request_rate,
            "burstiness": self.burstiness,
            "num_requests": self.num_requests,
            "duration_s": self.duration_s,
            "warmup": self.warmup,
            "seed": self.seed,
            "timeout_s": self.timeout_s,
            "ignore_eos": self.ignore_eos,
            "priority_body": self.priority_body,
        }


def interarrival_gaps(rate: float, burstiness: float, rng: random.Random) -> Iterator[float]:
    """Seconds between arrivals: gamma(shape=burstiness, mean=1/rate); 0 for rate=inf."""
    if math.isinf(rate):
        while True:
            yield 0.0
    scale = 1.0 / (rate * burstiness)
    while True:
        yield rng.gammavariate(burstiness, scale)


def arrival_offsets(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """The first `n` send times (seconds from the start; the first at 0)."""
    gaps = interarrival_gaps(rate, burstiness, random.Random(f"{seed}:arrivals"))
    out, t = [], 0.0
    for i in range(n):
        if i:
            t += next(gaps)
        out.append(t)
    return out


@dataclass
class BenchResult:
    """A finished run: its configuration, every record, and the summary."""

    config: dict[str, Any]
    records: list[RequestRecord]
    duration_s: float
    started_at: float
    summary: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The `--json` file's content."""
        return {
            "version": RESULT_VERSION,
            "started_at": self.started_at,
            "config": self.config,
            "summary": self.summary,
            "records": [r.to_dict() for r in self.records],
        }


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error_message(body: bytes | str) -> str:
    """The `message` of an OpenAI-style error body, else the body itself."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        obj = json.loads(text)
    except ValueError:
        return _short(text)
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict) and err.get("message"):
            return _short(str(err["message"]))
        if isinstance(obj.get("message"), str):
            return _short(obj["message"])
    return _short(text)


class BenchRunner:
    """Sends a workload with a load pattern and records every request."""

    def __init__(
        self,
        load: LoadConfig,
        workload: Workload,
        on_record: Callable[[RequestRecord], None] | None = None,
    ):
        load.validate()
        self.load = load
        self.workload = workload
        self.on_record = on_record
        self.records: list[RequestRecord] = []
        self._url = load.url + ENDPOINTS[load.endpoint]
        self._stream = load.stream and load.endpoint != "embeddings"
        self._t0 = 0.0

    # ------------------------------------------------------------ request shape

    def build(self, req: BenchRequest) -> tuple[dict[str, Any], dict[str, str]]:
        """The JSON body and headers for `req` on this endpoint."""
        load = self.load
        headers = {"Content-Type": "application/json"}
        if load.api_key:
            headers.update(protocol.bearer(load.api_key))
        if req.priority_set:
            headers[protocol.HEADER_PRIORITY] = req.cls
        if req.slo_e2e_ms is not None:
            headers[protocol.HEADER_DEADLINE] = f"{req.slo_e2e_ms:g}"
        body: dict[str, Any] = {"model": load.model}
        if load.endpoint == "embeddings":
            body["input"] = req.text()
        else:
            if load.endpoint == "chat":
                body["messages"] = req.chat_messages()
            else:
                body["prompt"] = req.text()
            if req.max_tokens is not None:
                body["max_tokens"] = req.max_tokens
            if load.ignore_eos:
                body["ignore_eos"] = True  # fixed output lengths, as vllm bench serve's flag
            if self._stream:
                body["stream"] = True
                body["stream_options"] = {"include_usage": True}
        if load.priority_body and req.priority_set:
            body["priority"] = req.cls
        body.update(load.extra_body)
        return body, headers

    # ------------------------------------------------------------ one request

    async def _send(self, session, req: BenchRequest, warmup: bool) -> RequestRecord:
        import aiohttp

        body, headers = self.build(req)
        data = json.dumps(body).encode()
        rec = RequestRecord(
            index=req.index,
            cls=req.cls,
            start_s=time.perf_counter() - self._t0,
            warmup=warmup,
            input_tokens=req.input_tokens,
            slo_ttft_ms=req.slo_ttft_ms,
            slo_e2e_ms=req.slo_e2e_ms,
        )
        st = time.perf_counter()
        try:
            async with session.post(self._url, data=data, headers=headers) as resp:
                rec.status = resp.status
                if resp.status != 200:
                    rec.error = f"HTTP {resp.status}: {_error_message(await resp.read())}"
                elif self._stream:
                    await self._read_stream(resp, rec, st)
                else:
                    self._read_json(await resp.read(), rec)
        except asyncio.TimeoutError:
            rec.error = f"timeout after {self.load.timeout_s:g}s"
        except aiohttp.ClientConnectorError as exc:
            rec.error = f"can't connect to {self.load.url}: {_short(str(exc.os_error or exc), 120)}"
        except aiohttp.ClientError as exc:
            rec.error = f"{type(exc).__name__}: {_short(str(exc), 120)}"
        rec.e2e_s = time.perf_counter() - st
        rec.ok = rec.error is None
        return rec

    async def _read_stream(self, resp, rec: RequestRecord, st: float) -> None:
        chat = self.load.endpoint == "chat"
        chunks = 0
        usage_tokens: int | None = None
        last = st
        buffer = b""
        # Raw reads, split here: cheaper than aiohttp's per-line reads, and events
        # that arrive in one read share one arrival time anyway.
        async for raw in resp.content.iter_any():
            now = time.perf_counter()
            buffer += raw
            if b"\n" not in raw:
                continue
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    buffer = b""
                    break
                try:
                    obj = json.loads(payload)
                except ValueError:
                    rec.error = f"bad SSE payload: {_short(payload.decode('utf-8', 'replace'), 80)}"
                    return
                if not isinstance(obj, dict):
                    continue
                if "error" in obj:
                    rec.error = f"stream error: {_error_message(json.dumps(obj))}"
                    return
                for choice in obj.get("choices") or ():
                    if chat:
                        delta = choice.get("delta") or {}
                        text = (
                            delta.get("content")
                            or delta.get("reasoning_content")
                            or delta.get("reasoning")
                        )
                    else:
                        text = choice.get("text")
                    if text:
                        if chunks == 0:
                            rec.ttft_s = now - st
                        else:
                            rec.itl_s.append(now - last)
                        last = now
                        chunks += 1
                        break  # one timing per SSE event (n=1 requests)
                usage = obj.get("usage")
                if isinstance(usage, dict):
                    if usage.get("completion_tokens") is not None:
                        usage_tokens = int(usage["completion_tokens"])
                    if usage.get("prompt_tokens") is not None:
                        rec.input_tokens = int(usage["prompt_tokens"])
        if usage_tokens is not None:
            rec.output_tokens, rec.token_source = usage_tokens, "usage"
        else:
            rec.output_tokens, rec.token_source = chunks, "chunks"

    def _read_json(self, raw: bytes, rec: RequestRecord) -> None:
        try:
            obj = json.loads(raw)
        except ValueError:
            rec.error = f"response is not JSON: {_short(raw.decode('utf-8', 'replace'), 80)}"
            return
        usage = obj.get("usage") if isinstance(obj, dict) else None
        if isinstance(usage, dict):
            if usage.get("prompt_tokens") is not None:
                rec.input_tokens = int(usage["prompt_tokens"])
            if usage.get("completion_tokens") is not None:
                rec.output_tokens, rec.token_source = int(usage["completion_tokens"]), "usage"

    # ------------------------------------------------------------ load patterns

    def _emit(self, rec: RequestRecord) -> None:
        self.records.append(rec)
        if self.on_record is not None:
            self.on_record(rec)

    async def _closed_loop(self, session, requests: Iterator[BenchRequest], c: int, warmup: bool):
        async def worker() -> None:
            for req in requests:  # a shared iterator: each request goes to one worker
                self._emit(await self._send(session, req, warmup))

        await asyncio.gather(*(worker() for _ in range(c)))

    async def _open_loop(self, session, requests: Iterator[BenchRequest]) -> None:
        load = self.load
        gaps = interarrival_gaps(
            load.request_rate or math.inf, load.burstiness, random.Random(f"{load.seed}:arrivals")
        )
        cap = asyncio.Semaphore(load.concurrency) if load.concurrency else None
        tasks: set[asyncio.Task] = set()

        async def one(req: BenchRequest) -> None:
            if cap is None:
                self._emit(await self._send(session, req, False))
                return
            async with cap:
                self._emit(await self._send(session, req, False))

        due = self._t0
        for i, req in enumerate(requests):
            if i:
                due += next(gaps)
            if load.duration_s is not None and due - self._t0 >= load.duration_s:
                break
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(req))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)

    def _measured_requests(self) -> Iterator[BenchRequest]:
        load = self.load
        if load.num_requests is not None:
            # Made up front (as vllm bench serve does): prompt making and token
            # counting then cost nothing while requests are being timed.
            return iter([self.workload.request(i) for i in range(load.num_requests)])
        return self._requests_until_deadline()

    def _requests_until_deadline(self) -> Iterator[BenchRequest]:
        load = self.load
        for i in itertools.count():
            # Closed loop only: the open loop stops by arrival time instead.
            if (
                load.duration_s is not None
                and load.mode == "closed"
                and time.perf_counter() - self._t0 >= load.duration_s
            ):
                return
            yield self.workload.request(i)

    async def run_async(self) -> BenchResult:
        """Warm up, then run the measured phase; returns every record and the summary."""
        import aiohttp

        load = self.load
        started_at = time.time()
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        timeout = aiohttp.ClientTimeout(total=load.timeout_s)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            if load.warmup:
                self._t0 = time.perf_counter()
                warm = (self.workload.request(i, warmup=True) for i in range(load.warmup))
                await self._closed_loop(
                    session, warm, min(load.warmup, load.concurrency or 1), warmup=True
                )
            requests = self._measured_requests()
            self._t0 = time.perf_counter()
            if load.mode == "closed":
                await self._closed_loop(session, requests, load.concurrency or 1, warmup=False)
            else:
                await self._open_loop(session, requests)
        measured = [r for r in self.records if not r.warmup]
        duration = measured_duration(measured)
        config = {
            **load.describe(),
            "workload": self.workload.config.describe(),
            "token_counter": self.workload.counter.kind,
        }
        return BenchResult(
            config, self.records, duration, started_at, summarize(measured, duration)
        )

    def run(self) -> BenchResult:
        """`run_async` in a fresh event loop."""
        return asyncio.run(self.run_async())
