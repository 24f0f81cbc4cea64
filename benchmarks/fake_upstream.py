"""A fast fake OpenAI upstream for the gateway overhead benchmark (and fault injection).

This is the one place a fake engine belongs: it answers instantly so that what
the benchmark measures is the gateway's own cost, not an engine's. Real engines
(vLLM, the embedding server) are what every functional test uses.

    python benchmarks/fake_upstream.py --port 9001 [--model fake] [--chunks 16]
        [--status 200] [--delay-ms 0] [--break-after N]

`--delay-ms` waits before a unary answer and between SSE chunks;
`--status 500` answers every inference request with that status;
`--break-after N` drops the connection after N SSE chunks (mid-stream failure).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiohttp import web


def build_app(
    model: str = "fake",
    chunks: int = 16,
    status: int = 200,
    delay_ms: float = 0.0,
    break_after: int | None = None,
) -> web.Application:
    """The aiohttp app; pre-encoded bodies keep its own cost near zero."""
    created = int(time.time())
    chat = json.dumps(
        {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "hello from the fake upstream"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11},
        }
    ).encode()
    completion = json.dumps(
        {
            "id": "cmpl-fake",
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "text": " hello", "finish_reason": "length"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
        }
    ).encode()
    embedding = json.dumps(
        {
            "object": "list",
            "model": model,
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1] * 8}],
            "usage": {"prompt_tokens": 2, "total_tokens": 2},
        }
    ).encode()
    chunk = (
        b"data: "
        + json.dumps(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": {"content": "tok"}, "finish_reason": None}],
            }
        ).encode()
        + b"\n\n"
    )
    error = json.dumps({"error": {"message": "injected failure", "type": "server_error"}}).encode()

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="")

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": model, "object": "model"}]})

    async def infer(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        streaming = b'"stream":true' in body.replace(b" ", b"")
        if delay_ms and not streaming:
            await asyncio.sleep(delay_ms / 1000)
        if status != 200:
            return web.Response(body=error, status=status, content_type="application/json")
        path = request.path
        if path.endswith("/embeddings"):
            return web.Response(body=embedding, content_type="application/json")
        if streaming:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(chunks):
                if break_after is not None and i >= break_after:
                    request.transport.close()
                    return resp
                await resp.write(chunk)
                if delay_ms:
                    await asyncio.sleep(delay_ms / 1000)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        return web.Response(
            body=chat if path.endswith("/chat/completions") else completion,
            content_type="application/json",
        )

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", infer)
    app.router.add_post("/v1/completions", infer)
    app.router.add_post("/v1/embeddings", infer)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="fake")
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--status", type=int, default=200)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--break-after", type=int, default=None)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(
        build_app(args.model, args.chunks, args.status, args.delay_ms, args.break_after),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
    )


if __name__ == "__main__":
    main()
