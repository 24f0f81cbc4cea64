"""Errors that reach the user as one line and a documented exit code."""

from __future__ import annotations


class ExitCode:
    """Exit codes shared by every command (documented in docs/cli.md)."""

    OK = 0
    FAILED = 1
    BAD_INPUT = 2
    NOT_FOUND = 3
    RESOURCE = 4
    INTERRUPTED = 130


class SageError(Exception):
    """An expected failure: printed as one line, never as a traceback."""

    exit_code: int = ExitCode.FAILED

    def __init__(self, message: str, *, hint: str | None = None, details: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details

    def one_line(self) -> str:
        """The message with its fix, as printed on stderr."""
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def to_dict(self) -> dict:
        """A JSON-friendly form, for `--json` output and HTTP error bodies."""
        return {
            "error": type(self).__name__,
            "message": self.message,
            "hint": self.hint,
            "exit_code": self.exit_code,
        }


class OperationFailed(SageError):
    """The operation was attempted and failed (exit 1)."""

    exit_code = ExitCode.FAILED


class BadInput(SageError):
    """Bad arguments, file contents or usage (exit 2)."""

    exit_code = ExitCode.BAD_INPUT


class NotFound(SageError):
    """A named engine, preset or model does not exist (exit 3)."""

    exit_code = ExitCode.NOT_FOUND


class ResourceUnavailable(SageError):
    """A port or GPU memory is not available (exit 4)."""

    exit_code = ExitCode.RESOURCE


class StateCorrupted(SageError):
    """The state file can't be read; it is left untouched for the user to inspect."""

    exit_code = ExitCode.FAILED
