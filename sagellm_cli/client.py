"""A small Python client for the gateway (seed 004's `UnifiedInferenceClient`).

    from sagellm_cli.client import UnifiedInferenceClient
    client = UnifiedInferenceClient("http://127.0.0.1:8889")
    text = client.chat([{"role": "user", "content": "hi"}], model="tiny", max_tokens=16)
    vectors = client.embed(["a", "b"], model="all-MiniLM-L6-v2")

The official `openai` package works against the gateway unchanged; this client
exists for scripts that want two calls and no extra dependency (httpx, imported
lazily, is already one of ours).
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    """The gateway answered with an error; `status` and the OpenAI-style `body` are kept."""

    def __init__(self, status: int, body: Any):
        error = body.get("error", {}) if isinstance(body, dict) else {}
        message = error.get("message") if isinstance(error, dict) else None
        super().__init__(f"HTTP {status}: {message or body}")
        self.status = status
        self.body = body


class UnifiedInferenceClient:
    """Chat and embeddings against one OpenAI-compatible base URL (with or without `/v1`)."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8889",
        api_key: str | None = None,
        timeout: float = 600.0,
    ):
        import httpx

        base = base_url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        resp = self._http.post(path, json=payload)
        try:
            body = resp.json()
        except ValueError:
            body = resp.text
        if resp.status_code != 200:
            raise GatewayError(resp.status_code, body)
        return body

    def chat(
        self, messages: list[dict[str, Any]] | str, model: str | None = None, **kw: Any
    ) -> str:
        """The assistant's reply text; `kw` passes through (max_tokens, temperature, ...).

        The full response is kept in `self.last_response`.
        """
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        payload: dict[str, Any] = {"messages": messages, **kw}
        if model:
            payload["model"] = model
        self.last_response = self._post("/chat/completions", payload)
        return self.last_response["choices"][0]["message"]["content"] or ""

    def embed(self, texts: list[str] | str, model: str | None = None) -> list[list[float]]:
        """One vector per text, in input order."""
        payload: dict[str, Any] = {"input": [texts] if isinstance(texts, str) else list(texts)}
        if model:
            payload["model"] = model
        self.last_response = self._post("/embeddings", payload)
        data = sorted(self.last_response["data"], key=lambda d: d["index"])
        return [d["embedding"] for d in data]

    def models(self) -> list[str]:
        """Model names the gateway serves."""
        resp = self._http.get("/models")
        if resp.status_code != 200:
            raise GatewayError(resp.status_code, resp.json())
        return [m["id"] for m in resp.json()["data"]]

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> UnifiedInferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
