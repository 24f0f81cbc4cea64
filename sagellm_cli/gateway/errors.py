"""OpenAI-style error bodies, and mapping SageError exit codes to HTTP statuses."""

from __future__ import annotations

import json

from sagellm_cli.core.errors import ExitCode, SageError

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
}

_STATUS_FOR_EXIT = {
    ExitCode.BAD_INPUT: 400,
    ExitCode.NOT_FOUND: 404,
    ExitCode.RESOURCE: 409,
    ExitCode.FAILED: 500,
}


def error_body(status: int, message: str, code: str | None = None, **extra) -> bytes:
    """`{"error": {"message", "type", "param", "code", ...}}` as JSON bytes."""
    error = {"message": message, "type": _TYPES.get(status, "error"), "param": None, "code": code}
    error.update(extra)
    return json.dumps({"error": error}).encode()


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
