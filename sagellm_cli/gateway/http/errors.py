"""OpenAI-style error bodies, and mapping SageError exit codes to HTTP statuses."""

from __future__ import annotations

import json
import logging
import uuid

from sagellm_cli.core.errors import BadInput, ExitCode, SageError
from sagellm_cli.core.protocol import error_object

_STATUS_FOR_EXIT = {
    ExitCode.BAD_INPUT: 400,
    ExitCode.NOT_FOUND: 404,
    ExitCode.RESOURCE: 409,
    ExitCode.FAILED: 500,
}


def error_body(status: int, message: str, code: str | None = None, **extra) -> bytes:
    """`{"error": {"message", "type", "param", "code", ...}}` as JSON bytes."""
    return json.dumps(error_object(status, message, code, **extra)).encode()


async def send_json(send, status: int, body: bytes, extra: list | None = None) -> None:
    """A complete JSON response on a raw ASGI `send` (the hot path builds no Response)."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def status_for(exc: SageError) -> int:
    """The HTTP status of a core error (exit 2 -> 400, 3 -> 404, 4 -> 409, 1 -> 500)."""
    return _STATUS_FOR_EXIT.get(exc.exit_code, 500)


def sage_error_body(exc: SageError) -> bytes:
    """An OpenAI-style body carrying the core error's message, hint and exit code."""
    status = status_for(exc)
    return error_body(
        status,
        exc.one_line(),
        code=type(exc).__name__,
        hint=exc.hint,
        exit_code=exc.exit_code,
        details=exc.details,
    )


def internal_error(exc: BaseException, scope: dict) -> tuple[str, bytes]:
    """Log an unexpected exception under a fresh id; return the id and an OpenAI-style 500
    body that carries the id and no traceback."""
    error_id = uuid.uuid4().hex[:16]
    exc.sagellm_error_id = error_id  # type: ignore[attr-defined]
    logging.getLogger("sagellm.gateway").error(
        "internal error %s on %s %s", error_id, scope.get("method"), scope.get("path"),
        exc_info=exc,
    )  # fmt: skip
    body = error_body(
        500,
        f"internal error (id {error_id}); the gateway log has the details",
        code="internal_error",
        error_id=error_id,
    )
    return error_id, body


class BodyTooLarge(Exception):
    """A request body over `--max-body-mb` (413)."""


def parse_json(raw: bytes):
    """Decode a request body; invalid or absurdly nested JSON is a BadInput (400), never a 500."""
    if not raw.strip():
        raise BadInput("the request body is empty; send a JSON object")
    try:
        return json.loads(raw)
    except RecursionError:
        raise BadInput("the request body nests JSON too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise BadInput("the request body is not valid JSON") from None
