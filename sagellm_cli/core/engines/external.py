"""External engines: OpenAI-compatible servers that something else runs and we only route to.

The seeds' deployment model (instances registered by host and port): a Kubernetes service,
another team's vLLM, an SGLang or llama.cpp server. `sage llm engine register URL` records
one with `runtime: external`; the gateway routes to it, health-checks it (`GET /v1/models`:
the one route every such server has) and drains it like any other engine. Stopping it only
unregisters it: no signal ever goes anywhere (core/launchers/external.py).
"""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sagellm_cli.core import protocol
from sagellm_cli.core.errors import BadInput, OperationFailed
from sagellm_cli.core.launchers.external import NODE_PREFIX
from sagellm_cli.core.lifecycle import Status
from sagellm_cli.core.records import EXTERNAL, EngineRecord

if TYPE_CHECKING:
    from sagellm_cli.core.engines.manager import EngineManager

HEALTH_PATH = protocol.health_path(external=True)
CHECK_TIMEOUT_S = 10.0


def normalise_url(url: str) -> str:
    """`http://host[:port][/prefix]` without a trailing `/` or `/v1` (BadInput otherwise)."""
    parts = urlsplit(url.strip())
    if parts.scheme == "https":
        raise BadInput(
            f"{url!r}: the gateway reaches engines over plain http:// only (no TLS yet)",
            hint="register the server's in-cluster http:// address, or one of a local proxy",
        )
    if parts.scheme != "http" or not parts.hostname:
        raise BadInput(f"{url!r} is not an http URL", hint="e.g. http://10.0.0.5:8000")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise BadInput(f"{url!r} has an invalid port") from None
    if parts.query or parts.fragment or parts.username:
        raise BadInput(f"{url!r} must not carry a query, a fragment or credentials")
    path = parts.path.rstrip("/").removesuffix(protocol.V1)
    return f"{parts.scheme}://{parts.netloc}{path}"


def served_models(url: str, timeout: float = CHECK_TIMEOUT_S) -> list[str]:
    """The model ids `GET URL/v1/models` lists (OperationFailed if it does not answer)."""
    from sagellm_cli.core.engines import probe

    try:
        status, body = probe.get(url, HEALTH_PATH, timeout)
    except (OSError, http.client.HTTPException) as exc:
        raise OperationFailed(
            f"{url} does not answer {HEALTH_PATH}: {exc}",
            hint="check the URL, or register anyway with --no-check",
        ) from None
    if status != 200:
        raise OperationFailed(f"{url}{HEALTH_PATH} answered {status}", hint="--no-check skips")
    try:
        return [str(m["id"]) for m in json.loads(body)["data"]]
    except (ValueError, KeyError, TypeError):
        raise OperationFailed(f"{url}{HEALTH_PATH} is not an OpenAI model list") from None


@dataclass
class Registration:
    """What `engine register` and the management API ask for."""

    url: str
    model: str | None = None
    kind: str = "llm"
    label: str | None = None
    role: str = "general"
    max_inflight: int | None = None
    cost_per_1k_tokens: float | None = None
    check: bool = True
    # The engine's vLLM KV connector (P/D disaggregation, docs/routing.md), as it runs it.
    kv_connector: str | None = None


def parse_registration(data: Any) -> Registration:
    """A management API body as a Registration: strict types, unknown keys refused."""
    import dataclasses
    import typing

    from pydantic import ConfigDict, ValidationError, create_model

    from sagellm_cli.core.inputs.spec_schema import error_message, key_path

    if not isinstance(data, dict):
        raise BadInput("the registration must be a JSON object with at least 'url'")
    hints = typing.get_type_hints(Registration)
    fields = {
        f.name: (hints[f.name], ... if f.default is dataclasses.MISSING else f.default)
        for f in dataclasses.fields(Registration)
    }
    # Strict, as engine specs: "2" is not a number, unknown keys are errors.
    model = create_model(
        "Registration", __config__=ConfigDict(extra="forbid", strict=True), **fields
    )
    try:
        return Registration(**model.model_validate(data).model_dump())
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "extra_forbidden":
            message = f"unknown field {str(first['loc'][-1])!r}"
        else:
            message = error_message(first, key_path(tuple(first["loc"])))
        raise BadInput(f"invalid registration: {message}") from None


def is_link_local(url: str) -> bool:
    """True for link-local, unspecified or multicast IP literals (cloud metadata services
    live at 169.254.169.254: the management API must not proxy to them by default)."""
    import ipaddress

    try:
        address = ipaddress.ip_address(urlsplit(url).hostname or "")
    except ValueError:
        return False
    return address.is_link_local or address.is_unspecified or address.is_multicast


def register(
    manager: EngineManager,
    reg: Registration,
    *,
    preset: str | None = None,
    preset_engine: str | None = None,
) -> EngineRecord:
    """Record an external engine as `ready` (after checking it serves the model)."""
    from sagellm_cli.core.engines.manager import check_label_free, new_engine_id
    from sagellm_cli.core.inputs.limits import (
        MAX_LABEL_CHARS,
        MAX_MODEL_CHARS,
        MAX_NAME_CHARS,
        check_length,
    )
    from sagellm_cli.core.inputs.spec_schema import parse_engine_options

    # Before the URL is asked anything, and before a message could quote a huge value.
    check_length("'url'", reg.url, MAX_NAME_CHARS)
    check_length("'model'", reg.model, MAX_MODEL_CHARS)
    check_length("'label'", reg.label, MAX_LABEL_CHARS)
    url = normalise_url(reg.url)
    models = served_models(url) if reg.check else []
    model = reg.model
    if model is None:
        if len(models) != 1:
            raise BadInput(
                f"{url} serves {', '.join(models) or 'no model'}: say which with --model",
            )
        model = models[0]
    if reg.check and model not in models:
        raise BadInput(f"{url} does not serve {model!r}; it serves {', '.join(models) or 'none'}")
    spec = parse_engine_options(
        {
            "model": model, "kind": reg.kind, "runtime": EXTERNAL, "label": reg.label,
            "role": reg.role, "max_inflight": reg.max_inflight,
            "cost_per_1k_tokens": reg.cost_per_1k_tokens, "kv_connector": reg.kv_connector,
        },
        what="registration",
    )  # fmt: skip
    spec.preset, spec.preset_engine = preset, preset_engine
    parts = urlsplit(url)
    with manager.store.transaction() as state:
        manager.reconcile(state)
        check_label_free((r for r in state.engines.values() if r.is_live), spec.label)
        engine_id = new_engine_id(state)
        now = time.time()
        record = EngineRecord(
            id=engine_id, kind=spec.kind, runtime=EXTERNAL, model=model, served_model_name=model,
            host=parts.hostname, port=parts.port or 80,
            label=spec.label, status=Status.READY, created_at=now, started_at=now, ready_at=now,
            role=spec.role, node=NODE_PREFIX + parts.hostname, base_url=url, preset=preset,
            served_models=models, spec=spec, instance=url,
        )  # fmt: skip
        state.engines[engine_id] = record
        return record
