"""The service-time estimate behind `--slo-reject` and the queue's `Retry-After`.

Per model: an exponentially weighted mean of recent admitted-to-released times.
It is rough on purpose (per model, not per request length); docs/scheduling.md says
what that means for a mix of short and long answers.
"""

from __future__ import annotations

EWMA_ALPHA = 0.2
# Until this many requests have finished there is no estimate (and nothing is rejected).
MIN_SAMPLES = 3


class ServiceEstimator:
    """Mean service seconds per key (a model's (kind, name)), weighted towards recent requests."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], list[float]] = {}  # key -> [ewma_s, samples]

    def observe(self, key: tuple[str, str], seconds: float) -> None:
        """One request of `key` took `seconds` from admission to release."""
        entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = [seconds, 1]
        else:
            entry[0] += EWMA_ALPHA * (seconds - entry[0])
            entry[1] += 1

    def estimate(self, key: tuple[str, str]) -> float | None:
        """The mean service seconds of `key`, or None while fewer than MIN_SAMPLES finished."""
        entry = self._entries.get(key)
        if entry is None or entry[1] < MIN_SAMPLES:
            return None
        return entry[0]
