"""The one fake OpenAI upstream of the tests and benchmarks (an aiohttp app).

It stands in for an engine only where the point is the code in front of it (the
gateway's fault handling, the scheduler's queue order, the bench's numbers):
every answer is known in advance. Real engines are what the functional tests use.

Routes: GET /health, GET /v1/models, POST /v1/chat/completions, /v1/completions,
/v1/embeddings; plus GET /fake/seen (what it received) and POST /fake/release
{"tag": T} (let a held request go) for a fake running in another process.

What it answers (every option can be changed while it runs, in-process):
- `ttft` seconds before the first token, then `chunks` SSE chunks `itl` seconds
  apart (`chunks=None`: the request's max_tokens, else 16); a unary answer waits
  `latency` (None: ttft + itl * (tokens - 1)), an embedding `latency` or `ttft`;
- `ttft_by_class`: the TTFT by the request's X-Priority header;
- `status` (every inference request) or `status_by_model`: an OpenAI error body
  whose message is `error_message` formatted with {status};
- `break_after`: the connection drops after N SSE chunks (a stream broken mid-way);
- `role_delta`: a chat stream opens with a role-only delta, as vLLM does;
- `usage`: a stream ends with a usage chunk when stream_options.include_usage;
- `kv_params`: a unary answer to a P/D prefill request (`kv_transfer_params` with
  `do_remote_decode`) carries these `kv_transfer_params`, as a vLLM prefill engine's does;
- `held`: each request waits until the test calls `release(tag)`, where the tag is
  the first message's content (or the prompt); `echo` answers with the tag.

In-process, in a thread with its own event loop:

    with FakeUpstream(status=500) as fake:
        fake.url, fake.port, fake.seen, fake.release("tag")

As a separate process (where a test needs its pid):

    python tests/fakes.py --port 9001 [--model fake] [--chunks N] [--status 500]
        [--ttft-ms MS] [--itl-ms MS] [--latency-ms MS] [--delay-ms MS]
        [--break-after N] [--held] [--echo] [--role-delta]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache

from aiohttp import web

DEFAULT_TOKENS = 16
PROMPT_TOKENS = 7
EMBEDDING_TOKENS = 11


@lru_cache(maxsize=256)
def _unary(chat: bool, model: str, n: int, text: str | None) -> bytes:
    """A chat.completion or text_completion body of `n` tokens (cached: cheap to serve)."""
    content = text if text is not None else "".join(f"t{i} " for i in range(n))
    choice = (
        {"index": 0, "message": {"role": "assistant", "content": content}}
        if chat
        else {"index": 0, "text": content}
    )
    choice["finish_reason"] = "length"
    return json.dumps(
        {
            "id": "chatcmpl-fake" if chat else "cmpl-fake",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": {
                "prompt_tokens": PROMPT_TOKENS,
                "completion_tokens": n,
                "total_tokens": PROMPT_TOKENS + n,
            },
        }
    ).encode()


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


@lru_cache(maxsize=256)
def _chunks(chat: bool, model: str, n: int) -> tuple[bytes, ...]:
    """The `n` SSE token events of a stream (cached)."""
    head = {
        "id": "chatcmpl-fake" if chat else "cmpl-fake",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
    }
    events = []
    for i in range(n):
        choice = (
            {"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}
            if chat
            else {"index": 0, "text": f"t{i} ", "finish_reason": None}
        )
        events.append(_event({**head, "choices": [choice]}))
    return tuple(events)


def _tag(body: dict) -> str:
    """What identifies a request to the test: its first message's content, or its prompt."""
    messages = body.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[0], dict):
        return str(messages[0].get("content", ""))
    return str(body.get("prompt", body.get("input", "")))


@dataclass
class FakeUpstream:
    """A configurable fake OpenAI server (see the module docstring)."""

    model: str = "fake"
    chunks: int | None = None
    ttft: float = 0.0
    itl: float = 0.0
    latency: float | None = None
    ttft_by_class: dict[str, float] = field(default_factory=dict)
    status: int = 200
    status_by_model: dict[str, int] = field(default_factory=dict)
    error_message: str = "injected failure"
    break_after: int | None = None
    role_delta: bool = False
    usage: bool = True
    held: bool = False
    echo: bool = False
    record: bool = True
    kv_params: dict | None = None
    host: str = "127.0.0.1"
    port: int = 0
    seen: list[dict] = field(default_factory=list)  # {"path", "headers", "body"} per request

    def __post_init__(self) -> None:
        self._gates: dict[str, asyncio.Event] = {}
        self._open = False  # every gate open (while stopping)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # -- what the test reads -----------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def bodies(self) -> list[dict]:
        return [s["body"] for s in self.seen]

    # -- held requests -------------------------------------------------------

    def _gate(self, tag: str) -> asyncio.Event:
        gate = self._gates.get(tag)
        if gate is None:
            gate = self._gates[tag] = asyncio.Event()
            if self._open:
                gate.set()
        return gate

    def _release(self, tag: str | None) -> None:
        if tag is None:
            self._open = True
            for gate in self._gates.values():
                gate.set()
        else:
            self._gate(tag).set()

    def release(self, tag: str | None = None) -> None:
        """Let the held request(s) tagged `tag` answer (None: every one, now and later).

        Callable from any thread; a tag released before its request arrives is not held.
        """
        loop = self._loop
        if loop is not None and loop.is_running():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._release, tag)
        else:
            self._release(tag)

    # -- handlers ------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": self.model, "object": "model"}]}
        )

    async def _seen(self, request: web.Request) -> web.Response:
        return web.json_response(self.seen)

    async def _release_endpoint(self, request: web.Request) -> web.Response:
        self._release((await request.json()).get("tag"))
        return web.json_response({"released": True})

    def _error(self, status: int) -> web.Response:
        body = {
            "error": {"message": self.error_message.format(status=status), "type": "server_error"}
        }
        return web.json_response(body, status=status)

    async def _infer(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            return web.json_response({"error": {"message": "bad JSON"}}, status=400)
        if not isinstance(body, dict):
            body = {}
        if self.record:
            self.seen.append({"path": request.path, "headers": dict(request.headers), "body": body})
        tag = _tag(body)
        if self.held:
            await self._gate(tag).wait()
        status = self.status_by_model.get(body.get("model")) or self.status
        if status != 200:
            return self._error(status)
        path = request.path
        if path.endswith("/embeddings"):
            await asyncio.sleep(self.ttft if self.latency is None else self.latency)
            return web.json_response(
                {
                    "object": "list",
                    "model": self.model,
                    "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                    "usage": {"prompt_tokens": EMBEDDING_TOKENS, "total_tokens": EMBEDDING_TOKENS},
                }
            )
        chat = path.endswith("/chat/completions")
        n = self.chunks if self.chunks is not None else int(body.get("max_tokens") or 0)
        n = n or DEFAULT_TOKENS
        ttft = self.ttft_by_class.get(request.headers.get("X-Priority", ""), self.ttft)
        model = str(body.get("model") or self.model)
        if not body.get("stream"):
            delay = ttft + self.itl * (n - 1) if self.latency is None else self.latency
            if delay:
                await asyncio.sleep(delay)
            text = tag if self.echo else None
            data = _unary(chat, model, n, text)
            if self.kv_params is not None and (body.get("kv_transfer_params") or {}).get(
                "do_remote_decode"
            ):  # a P/D prefill request: say where the KV is, as vLLM's connector does
                data = json.dumps({**json.loads(data), "kv_transfer_params": self.kv_params})
                data = data.encode()
            return web.Response(body=data, content_type="application/json")

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if chat and self.role_delta:  # must not count as the first token
            await resp.write(
                _event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            )
        if ttft:
            await asyncio.sleep(ttft)
        # A body's `fake_itl_ms` paces this stream (benchmarks: chunks that cannot coalesce).
        itl = float(body.get("fake_itl_ms") or 0) / 1000 or self.itl
        for i, chunk in enumerate(_chunks(chat, model, n)):
            if self.break_after is not None and i >= self.break_after:
                request.transport.close()
                return resp
            if i and itl:
                await asyncio.sleep(itl)
            await resp.write(chunk)
        if self.usage and (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": n}
            await resp.write(_event({"choices": [], "usage": usage}))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def app(self) -> web.Application:
        application = web.Application()
        application.router.add_get("/health", self._health)
        application.router.add_get("/v1/models", self._models)
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            application.router.add_post(path, self._infer)
        application.router.add_get("/fake/seen", self._seen)
        application.router.add_post("/fake/release", self._release_endpoint)
        return application

    # -- running in a background thread ---------------------------------------

    def start(self) -> FakeUpstream:
        """Serve on host:port (0: a free one) from a daemon thread; returns when listening."""
        if self._thread is not None:
            raise RuntimeError("the fake upstream already runs")
        self._open = False
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        async def boot() -> None:
            self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=0.25)
            await self._runner.setup()
            await web.TCPSite(self._runner, self.host, self.port).start()
            self.port = self._runner.addresses[0][1]

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(boot())
            except BaseException as exc:  # noqa: BLE001 - handed to start()
                failure.append(exc)
                started.set()
                self._loop.run_until_complete(self._cleanup())
                self._loop.close()
                return
            started.set()
            try:
                self._loop.run_forever()
            finally:
                self._loop.run_until_complete(self._cleanup())
                self._loop.close()

        self._thread = threading.Thread(target=serve, name=f"fake-upstream-{id(self)}", daemon=True)
        self._thread.start()
        if not started.wait(10) or failure:
            self.stop()
            raise RuntimeError(f"the fake upstream did not start: {failure[:1]}")
        return self

    async def _cleanup(self) -> None:
        self._release(None)  # held requests answer, so that nothing waits on them
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def stop(self) -> None:
        """Close the listener and every connection, stop the loop and join the thread."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop already closed
            loop.call_soon_threadsafe(loop.stop)
        thread.join(15)
        if thread.is_alive():
            raise RuntimeError("the fake upstream's thread did not stop")
        self._thread = self._loop = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- as a process -------------------------------------------------------------


def _ms(value: float | None) -> float | None:
    return None if value is None else value / 1000


def parser(description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description or __doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", default="fake")
    p.add_argument("--chunks", type=int, default=None, help="SSE chunks (default: max_tokens)")
    p.add_argument("--status", type=int, default=200)
    p.add_argument("--ttft-ms", type=float, default=0.0)
    p.add_argument("--itl-ms", type=float, default=0.0)
    p.add_argument("--latency-ms", type=float, default=None, help="unary answers' delay")
    p.add_argument(
        "--delay-ms",
        type=float,
        default=None,
        help="shorthand: --latency-ms and --itl-ms both MS",
    )
    p.add_argument("--break-after", type=int, default=None)
    p.add_argument("--held", action="store_true", help="hold requests until POST /fake/release")
    p.add_argument("--echo", action="store_true", help="answer with the request's tag")
    p.add_argument("--role-delta", action="store_true")
    p.add_argument("--no-record", action="store_true", help="keep no list of requests")
    return p


@dataclass
class SleepyEngine(FakeUpstream):
    """FakeUpstream that also honours vLLM's sleep mode: POST /sleep, /wake_up and
    /collective_rpc (200 after `sleep_s` / `wake_s`), GET /is_sleeping. Asleep, it
    answers inference with 503, and a unary request that was running when it fell
    asleep with 500 (vLLM aborts those): so a scheduler that sleeps a busy engine shows.
    Paths in `hold` wait until `release(path)`; `calls` lists the sleep/wake requests."""

    sleep_s: float = 0.0
    wake_s: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.hold: set[str] = set()
        self.calls: list[str] = []
        self.asleep = False
        self._slept = 0  # sleeps so far: a request spanning one was aborted

    async def _sleep_wake(self, request: web.Request) -> web.Response:
        self.calls.append(request.path)
        if request.path in self.hold:
            await self._gate(request.path).wait()
        if request.path == "/sleep":
            self.asleep, self._slept = True, self._slept + 1
            await asyncio.sleep(self.sleep_s)
        elif request.path == "/wake_up":
            await asyncio.sleep(self.wake_s)
            self.asleep = False
        return web.Response(text="")

    async def _is_sleeping(self, request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": self.asleep})

    async def _infer(self, request: web.Request) -> web.StreamResponse:
        if self.asleep:
            return self._error(503)
        slept = self._slept
        response = await super()._infer(request)
        if self._slept != slept and type(response) is web.Response:
            return self._error(500)
        return response

    def app(self) -> web.Application:
        application = super().app()
        for path in ("/sleep", "/wake_up", "/collective_rpc"):
            application.router.add_post(path, self._sleep_wake)
        application.router.add_get("/is_sleeping", self._is_sleeping)
        return application


def from_args(args: argparse.Namespace) -> FakeUpstream:
    latency, itl = _ms(args.latency_ms), _ms(args.itl_ms)
    if args.delay_ms is not None:
        latency, itl = _ms(args.delay_ms), _ms(args.delay_ms)
    return FakeUpstream(
        model=args.model,
        chunks=args.chunks,
        status=args.status,
        ttft=_ms(args.ttft_ms),
        itl=itl,
        latency=latency,
        break_after=args.break_after,
        held=args.held,
        echo=args.echo,
        role_delta=args.role_delta,
        record=not args.no_record,
        host=args.host,
        port=args.port,
    )


def serve(fake: FakeUpstream, *, uvloop: bool = False) -> None:
    """Run `fake` in the foreground of this process until it is signalled."""
    if uvloop:
        with contextlib.suppress(ImportError):
            import uvloop as _uvloop

            _uvloop.install()
    web.run_app(fake.app(), host=fake.host, port=fake.port, access_log=None, print=None)


def main(argv: list[str] | None = None) -> None:
    serve(from_args(parser().parse_args(argv)))


if __name__ == "__main__":
    main()
