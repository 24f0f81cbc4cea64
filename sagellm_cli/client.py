"""Python clients for the gateway (seed 004's `UnifiedInferenceClient`), sync and async.

    from sagellm_cli.client import UnifiedInferenceClient
    client = UnifiedInferenceClient.create()            # the running local gateway
    text = client.chat([{"role": "user", "content": "hi"}], model="tiny", max_tokens=16)
    for delta in client.chat("hi", model="tiny", stream=True):
        print(delta, end="")
    vectors = client.embed(["a", "b"], model="all-MiniLM-L6-v2")

`AsyncUnifiedInferenceClient` has the same methods as coroutines. Both are thin layers
over httpx: `priority`, `slo_deadline_ms` and `cost_budget` become the gateway's
`X-Priority`, `X-SLO-Deadline-Ms` and `X-Cost-Budget` headers; every other keyword goes
into the OpenAI request body (max_tokens, temperature, ...). Inference never needs the
admin token; an API key (`api_key`, else `$SAGELLM_API_KEY`) is sent when there is one.
Errors are the project's typed exceptions (`GatewayError` subclasses BadInput, NotFound,
ResourceUnavailable or OperationFailed by HTTP status). The official `openai` package works
against the gateway unchanged.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sagellm_cli.core import protocol
from sagellm_cli.core.errors import (
    BadInput,
    NotFound,
    OperationFailed,
    ResourceUnavailable,
    SageError,
)

if TYPE_CHECKING:
    import httpx

PRIORITIES = protocol.PRIORITY_CLASSES
# Paths under `base_url`, which ends in /v1.
_CHAT = protocol.v1_relative(protocol.CHAT)
_COMPLETIONS = protocol.v1_relative(protocol.COMPLETIONS)
_EMBEDDINGS = protocol.v1_relative(protocol.EMBEDDINGS)
_MODELS = protocol.v1_relative(protocol.MODELS)
Messages = list[dict[str, Any]] | str


class GatewayError(SageError):
    """The gateway answered with an error; `status` and the OpenAI-style `body` are kept."""

    def __init__(self, status: int, body: Any):
        error = body.get("error", {}) if isinstance(body, dict) else {}
        message = error.get("message") if isinstance(error, dict) else None
        super().__init__(f"HTTP {status}: {message or body}")
        self.status = status
        self.body = body
        self.code = error.get("code") if isinstance(error, dict) else None


class GatewayBadRequest(GatewayError, BadInput):
    """400-like answers: the request itself is wrong."""


class GatewayNotFound(GatewayError, NotFound):
    """404: the model is not served."""


class GatewayUnavailable(GatewayError, ResourceUnavailable):
    """429 or 503: the queue is full, a budget or deadline can't be met, no engine is ready."""


class GatewayFailed(GatewayError, OperationFailed):
    """5xx: the engine failed (also mid-stream) and no other replica could take the request."""


def gateway_error(status: int, body: Any) -> GatewayError:
    """The typed error for an HTTP error answer."""
    if status == 404:
        return GatewayNotFound(status, body)
    if status in (429, 503):
        return GatewayUnavailable(status, body)
    if 400 <= status < 500:
        return GatewayBadRequest(status, body)
    return GatewayFailed(status, body)


@dataclass
class Answer:
    """One answer as the gateway sent it (`post`): the OpenAI JSON and who served it."""

    body: dict[str, Any]
    engine: str | None  # the engine id from `x-sagellm-engine`
    latency_s: float


def _unreachable(base_url: str, exc: Exception) -> OperationFailed:
    return OperationFailed(
        f"cannot reach the gateway at {base_url}: {type(exc).__name__}: {exc}",
        hint="is it running? see `sage llm serve --status`",
    )


def _messages(messages: Messages) -> list[dict[str, Any]]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise BadInput(
            "messages must be a string or a list of {'role', 'content'} dicts",
            hint='e.g. [{"role": "user", "content": "hi"}]',
        )
    return messages


def _split(params: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """The gateway's own keywords as headers; the rest stays for the body."""
    headers: dict[str, str] = {}
    priority = params.pop("priority", None)
    if priority is not None:
        if not isinstance(priority, str) or priority.lower() not in PRIORITIES:
            raise BadInput(f"unknown priority {priority!r}", hint=f"use one of {PRIORITIES}")
        headers[protocol.HEADER_PRIORITY] = priority.lower()
    for key, header in (
        ("slo_deadline_ms", protocol.HEADER_DEADLINE),
        ("cost_budget", protocol.HEADER_COST_BUDGET),
    ):
        value = params.pop(key, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise BadInput(f"{key} must be a number >= 0, not {value!r}")
        headers[header] = f"{value:g}"
    return headers, params


def _gateway_headers(params: dict[str, Any]) -> dict[str, str]:
    """`post`'s keywords: the gateway's own (priority, slo_deadline_ms, cost_budget) only."""
    headers, rest = _split(dict(params))
    if rest:
        raise BadInput(
            f"unknown keyword(s) {', '.join(sorted(rest))}",
            hint="post() takes priority, slo_deadline_ms and cost_budget; put the rest in body",
        )
    return headers


def _body(base: dict[str, Any], model: str | None, stream: bool, params: dict[str, Any]):
    body = {**params, **base}
    if model:
        body["model"] = model
    if stream:
        body["stream"] = True
        # The gateway counts output tokens from `usage`; ask for it unless told otherwise.
        body.setdefault("stream_options", {"include_usage": True})
    return body


def _decode(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return resp.text


class _StreamParser:
    """Text deltas from SSE lines of a chat or completion stream."""

    def __init__(self, chat: bool):
        self.chat = chat
        self.done = False
        self.usage: dict[str, Any] | None = None

    def feed(self, line: str) -> str | None:
        if not line.startswith("data:"):
            return None
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return None
        event = json.loads(data)
        if "error" in event:  # the engine failed mid-stream (docs/gateway.md)
            raise gateway_error(502, event)
        if event.get("usage"):
            self.usage = event["usage"]
        choices = event.get("choices") or []
        if not choices:
            return None
        choice = choices[0]
        text = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
        return text or None


class TextStream:
    """The text deltas of a streamed answer. Closing it early aborts the generation."""

    def __init__(self, response: httpx.Response, chat: bool, owner: UnifiedInferenceClient):
        self._response = response
        self._parser = _StreamParser(chat)
        self._owner = owner
        self._iter = self._deltas()

    def _deltas(self) -> Iterator[str]:
        try:
            for line in self._response.iter_lines():
                text = self._parser.feed(line)
                if text:
                    yield text
                if self._parser.done:
                    break
        finally:
            self._response.close()
            self._owner.last_usage = self._parser.usage

    def __iter__(self) -> Iterator[str]:
        return self._iter

    def __next__(self) -> str:
        return next(self._iter)

    def close(self) -> None:
        """Stop reading; the gateway closes the engine's stream."""
        self._iter.close()
        self._response.close()

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncTextStream:
    """`TextStream` for the async client: `async for delta in stream`."""

    def __init__(self, response: httpx.Response, chat: bool, owner: AsyncUnifiedInferenceClient):
        self._response = response
        self._parser = _StreamParser(chat)
        self._owner = owner
        self._iter = self._deltas()

    async def _deltas(self) -> AsyncIterator[str]:
        try:
            async for line in self._response.aiter_lines():
                text = self._parser.feed(line)
                if text:
                    yield text
                if self._parser.done:
                    break
        finally:
            await self._response.aclose()
            self._owner.last_usage = self._parser.usage

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iter

    async def __anext__(self) -> str:
        return await self._iter.__anext__()

    async def aclose(self) -> None:
        """Stop reading; the gateway closes the engine's stream."""
        await self._iter.aclose()
        await self._response.aclose()

    async def __aenter__(self) -> AsyncTextStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _Base:
    """What both clients share: the base URL, headers and answer parsing."""

    def __init__(self, base_url: str, api_key: str | None):
        from sagellm_cli.core.credentials import API_KEY_ENV

        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise BadInput(f"base_url {base_url!r} is not an http(s) URL",
                           hint="e.g. http://127.0.0.1:8889")  # fmt: skip
        base = base_url.rstrip("/")
        self.base_url = protocol.api_base(base)
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self._auth = protocol.bearer(key)
        self.last_response: Any = None
        self.last_usage: dict[str, Any] | None = None

    @staticmethod
    def _check(resp: httpx.Response) -> Any:
        if resp.status_code != 200:
            raise gateway_error(resp.status_code, _decode(resp))
        return resp.json()

    def _keep(self, body: dict[str, Any]) -> dict[str, Any]:
        self.last_response = body
        self.last_usage = body.get("usage")
        return body

    @staticmethod
    def _text(body: dict[str, Any], chat: bool) -> str:
        choice = body["choices"][0]
        return (choice["message"]["content"] if chat else choice["text"]) or ""

    @staticmethod
    def _vectors(body: dict[str, Any]) -> list[list[float]]:
        return [d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])]

    @staticmethod
    def _embed_body(texts: list[str] | str, model: str | None) -> dict[str, Any]:
        payload: dict[str, Any] = {"input": [texts] if isinstance(texts, str) else list(texts)}
        if model:
            payload["model"] = model
        return payload


class UnifiedInferenceClient(_Base):
    """Chat, completions, embeddings and models against one gateway (with or without `/v1`)."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8889",
        api_key: str | None = None,
        timeout: float = 600.0,
    ):
        import httpx

        super().__init__(base_url, api_key)
        self._http = httpx.Client(base_url=self.base_url, headers=self._auth, timeout=timeout)

    @classmethod
    def create(
        cls, base_url: str | None = None, api_key: str | None = None, timeout: float = 600.0
    ) -> UnifiedInferenceClient:
        """A client for `base_url`, else for the gateway recorded in the state file
        (NotFound when none runs)."""
        from sagellm_cli.core.engines.monitor import gateway_url

        return cls(base_url or gateway_url(), api_key=api_key, timeout=timeout)

    def _send(self, path: str, payload: dict[str, Any], headers: dict[str, str]):
        import httpx

        try:
            return self._http.post(path, json=payload, headers=headers)
        except httpx.HTTPError as exc:
            raise _unreachable(self.base_url, exc) from None

    def _post(self, path: str, payload: dict[str, Any], headers: dict[str, str]) -> Any:
        return self._keep(self._check(self._send(path, payload, headers)))

    def post(self, path: str, body: dict[str, Any], **gateway: Any) -> Answer:
        """POST an OpenAI request `body` to `path` (`/chat/completions`, `/completions`,
        `/embeddings`) and return the whole answer; `gateway` takes priority,
        slo_deadline_ms and cost_budget. Thread-safe (unlike `last_response`)."""
        headers = _gateway_headers(gateway)
        started = time.perf_counter()
        resp = self._send(path, body, headers)
        data = self._check(resp)
        return Answer(data, resp.headers.get(protocol.HEADER_ENGINE), time.perf_counter() - started)

    def _stream(self, path: str, payload: dict[str, Any], headers: dict[str, str], chat: bool):
        import httpx

        try:
            request = self._http.build_request("POST", path, json=payload, headers=headers)
            resp = self._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise _unreachable(self.base_url, exc) from None
        if resp.status_code != 200:
            resp.read()
            resp.close()
            raise gateway_error(resp.status_code, _decode(resp))
        return TextStream(resp, chat, self)

    def chat(
        self, messages: Messages, model: str | None = None, stream: bool = False, **params: Any
    ) -> Any:
        """The assistant's reply text, or with `stream=True` a `TextStream` of text deltas.

        `priority`, `slo_deadline_ms` and `cost_budget` go to the gateway's scheduler; every
        other keyword (max_tokens, temperature, ...) into the request. The full response is
        kept in `last_response`, its `usage` in `last_usage`.
        """
        headers, params = _split(params)
        body = _body({"messages": _messages(messages)}, model, stream, params)
        if stream:
            return self._stream(_CHAT, body, headers, chat=True)
        return self._text(self._post(_CHAT, body, headers), chat=True)

    def generate(
        self, prompt: str, model: str | None = None, stream: bool = False, **params: Any
    ) -> Any:
        """A completion of `prompt` (`/v1/completions`): text, or a `TextStream`."""
        if not isinstance(prompt, str):
            raise BadInput(f"prompt must be a string, not {type(prompt).__name__}")
        headers, params = _split(params)
        body = _body({"prompt": prompt}, model, stream, params)
        if stream:
            return self._stream(_COMPLETIONS, body, headers, chat=False)
        return self._text(self._post(_COMPLETIONS, body, headers), chat=False)

    def embed(self, texts: list[str] | str, model: str | None = None) -> list[list[float]]:
        """One vector per text, in input order."""
        return self._vectors(self._post(_EMBEDDINGS, self._embed_body(texts, model), {}))

    def models(self) -> list[str]:
        """Model names the gateway serves."""
        import httpx

        try:
            resp = self._http.get(_MODELS)
        except httpx.HTTPError as exc:
            raise _unreachable(self.base_url, exc) from None
        return [m["id"] for m in self._check(resp)["data"]]

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> UnifiedInferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncUnifiedInferenceClient(_Base):
    """`UnifiedInferenceClient` with coroutines; streams are `AsyncTextStream`s."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8889",
        api_key: str | None = None,
        timeout: float = 600.0,
    ):
        import httpx

        super().__init__(base_url, api_key)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self._auth, timeout=timeout)

    @classmethod
    def create(
        cls, base_url: str | None = None, api_key: str | None = None, timeout: float = 600.0
    ) -> AsyncUnifiedInferenceClient:
        """A client for `base_url`, else for the gateway recorded in the state file."""
        from sagellm_cli.core.engines.monitor import gateway_url

        return cls(base_url or gateway_url(), api_key=api_key, timeout=timeout)

    async def _send(self, path: str, payload: dict[str, Any], headers: dict[str, str]):
        import httpx

        try:
            return await self._http.post(path, json=payload, headers=headers)
        except httpx.HTTPError as exc:
            raise _unreachable(self.base_url, exc) from None

    async def _post(self, path: str, payload: dict[str, Any], headers: dict[str, str]) -> Any:
        return self._keep(self._check(await self._send(path, payload, headers)))

    async def post(self, path: str, body: dict[str, Any], **gateway: Any) -> Answer:
        """As `UnifiedInferenceClient.post`."""
        headers = _gateway_headers(gateway)
        started = time.perf_counter()
        resp = await self._send(path, body, headers)
        data = self._check(resp)
        return Answer(data, resp.headers.get(protocol.HEADER_ENGINE), time.perf_counter() - started)

    async def _stream(
        self, path: str, payload: dict[str, Any], headers: dict[str, str], chat: bool
    ) -> AsyncTextStream:
        import httpx

        try:
            request = self._http.build_request("POST", path, json=payload, headers=headers)
            resp = await self._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise _unreachable(self.base_url, exc) from None
        if resp.status_code != 200:
            await resp.aread()
            await resp.aclose()
            raise gateway_error(resp.status_code, _decode(resp))
        return AsyncTextStream(resp, chat, self)

    async def chat(
        self, messages: Messages, model: str | None = None, stream: bool = False, **params: Any
    ) -> Any:
        """As `UnifiedInferenceClient.chat`; `stream=True` gives an `AsyncTextStream`."""
        headers, params = _split(params)
        body = _body({"messages": _messages(messages)}, model, stream, params)
        if stream:
            return await self._stream(_CHAT, body, headers, chat=True)
        return self._text(await self._post(_CHAT, body, headers), chat=True)

    async def generate(
        self, prompt: str, model: str | None = None, stream: bool = False, **params: Any
    ) -> Any:
        """As `UnifiedInferenceClient.generate`."""
        if not isinstance(prompt, str):
            raise BadInput(f"prompt must be a string, not {type(prompt).__name__}")
        headers, params = _split(params)
        body = _body({"prompt": prompt}, model, stream, params)
        if stream:
            return await self._stream(_COMPLETIONS, body, headers, chat=False)
        return self._text(await self._post(_COMPLETIONS, body, headers), chat=False)

    async def embed(self, texts: list[str] | str, model: str | None = None) -> list[list[float]]:
        """One vector per text, in input order."""
        body = await self._post(_EMBEDDINGS, self._embed_body(texts, model), {})
        return self._vectors(body)

    async def models(self) -> list[str]:
        """Model names the gateway serves."""
        import httpx

        try:
            resp = await self._http.get(_MODELS)
        except httpx.HTTPError as exc:
            raise _unreachable(self.base_url, exc) from None
        return [m["id"] for m in self._check(resp)["data"]]

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncUnifiedInferenceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
