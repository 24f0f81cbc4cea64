"""Small input checks shared by the CLI and the library (BadInput naming the option)."""

from __future__ import annotations

import math

from sagellm_cli.core.errors import BadInput


def check_seconds(seconds: float, option: str = "--timeout") -> float:
    """Return `seconds` if it is a finite number >= 0; else BadInput (exit 2) naming `option`."""
    # `not >=` also catches nan, which compares false to everything.
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, (int, float))
        or not (math.isfinite(seconds) and seconds >= 0)
    ):
        raise BadInput(
            f"{option} must be a finite number of seconds (got {seconds!r})",
            hint=f"give {option} 0 or more",
        )
    return seconds
