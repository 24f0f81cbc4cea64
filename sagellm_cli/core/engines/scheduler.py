"""The model scheduler's decisions: which loaded engine may be unloaded, which one should
be, whether a model can load at all, and how deeply an engine sleeps (docs/supervisor.md).

Pure functions on snapshots (`Loaded`), no I/O and no clock of its own: the gateway's
supervisor builds the snapshots from the registry, the ledger and its measurements, and
does the unloading. So every rule here is unit-tested without processes.

The rules, in order:
- an engine with requests in flight or queued (its reference count) is never unloaded;
- a pinned engine (`pin`, `keep_alive` -1) or one under a lease (`engine hold`) is never
  unloaded by the scheduler;
- among the rest, `cost` picks the engine whose reload is expected to cost least per GiB
  it frees (measured reload time x how often it was needed recently: its frequency, so
  that a planner needed every other step stays and the tools swap), and then waits for it
  rather than evicting a more valuable engine that happens to be idle this instant:
  - burst first: while the target still has requests in flight or queued, or its burst is
    still arriving (a request within BURST_GAP_S), the swap waits; after PATIENCE_S the
    target is drained (new requests queue for it, the ones in flight finish) and unloaded;
  - minimum residency: an engine woken less than MIN_RESIDENCY_S ago is not unloaded
    (hysteresis: the requests it was woken for arrive just after the wake);
- `lru` (today's policy, kept as the baseline) unloads the least recently used engine
  with nothing in flight, and fails the request when there is none.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

POLICIES: tuple[str, ...] = ("cost", "lru")
# Host RAM kept free beyond a level-1 sleep's copy of the weights (the OS, page cache).
RAM_HEADROOM_GIB = 4.0
# Assumed until measured: vLLM wakes in about a second and starts cold in about a minute.
DEFAULT_WAKE_S = 1.0
DEFAULT_COLD_S = 60.0
# The requests of one agent step arrive within this of each other: an engine used this
# recently is mid-burst, and a swap waits for the burst to end.
BURST_GAP_S = 0.25
# How long a swap waits for its target's burst before draining it (bounds the wait of the
# requests queued for the model being loaded).
PATIENCE_S = 5.0
# An engine just woken is kept at least this long (hysteresis against thrashing).
MIN_RESIDENCY_S = 3.0


@dataclass(frozen=True)
class Loaded:
    """One engine that holds GPU memory, as the scheduler sees it at one moment."""

    id: str
    name: str  # its label, else its id (for messages)
    gpus: tuple[int, ...]
    frees_gib: float  # per GPU, what unloading it gives back
    held_gib: float = 0.0  # per GPU, what it holds now (for messages)
    refs: int = 0  # requests in flight plus requests queued for it
    pinned: bool = False  # `pin` or keep_alive -1
    leased_s: float = 0.0  # seconds its lease (`engine hold`) still runs
    busy: bool = False  # the supervisor is acting on it (an unload, a probe, a wake)
    ready: bool = True  # serving (a sleeping engine frees nothing more by "unloading")
    # Being woken or loaded, its memory already taken: it will serve the requests it is
    # woken for, and another load must wait for it rather than unload a neighbour.
    waking: bool = False
    idle_s: float = 0.0  # since its last request
    reload_s: float = DEFAULT_COLD_S  # measured: wake if it sleeps, else a cold start
    recent_uses: float = 0.0  # requests recently (decayed by age), plus queued ones
    resident_s: float = float("inf")  # since this gateway last woke or loaded it

    @property
    def protected(self) -> str | None:
        """Why the scheduler may never unload it ("pinned", "leased ..."), or None."""
        if self.pinned:
            return "pinned"
        if self.leased_s > 0:
            return f"leased for {self.leased_s:.0f}s more"
        return None

    @property
    def blocked(self) -> str | None:
        """Why it cannot be unloaded right now, or None if it can."""
        if self.protected:
            return self.protected
        if self.refs:
            return f"{self.refs} request(s) in flight or queued"
        if self.waking:
            return "being woken"
        if self.busy:
            return "being acted on"
        if not self.ready:
            return "not serving"
        return None


def keep_value(engine: Loaded) -> float:
    """Expected reload seconds per GiB freed if `engine` were unloaded now (lower is a
    better victim): reload cost x (1 + recent uses). Frequency, not idle time: between
    two bursts every engine of an agent loop is idle for a moment, the planner included."""
    return engine.reload_s * (1 + engine.recent_uses) / max(engine.frees_gib, 0.1)


def choose_victim(loaded: Iterable[Loaded], policy: str = "cost") -> Loaded | None:
    """The engine to unload to make room now, or None (see `decide` for the waits)."""
    return decide(loaded, policy, waited_s=0.0).victim


@dataclass(frozen=True)
class Decision:
    """What a load that lacks memory does now: unload `victim` (after draining its
    requests in flight when `drain`), or wait (`victim` None). `reason` and `ranked`
    (name, keep value, what holds it) are for the log."""

    victim: Loaded | None
    reason: str
    drain: bool = False
    ranked: tuple[tuple[str, float, str], ...] = ()
    target: str = ""  # the engine the decision is about (unloaded now or waited for)


def _hold(engine: Loaded) -> str | None:
    """Why the cost policy waits before unloading `engine`, or None."""
    if engine.blocked:
        return engine.blocked
    if engine.resident_s < MIN_RESIDENCY_S:
        return f"woken {engine.resident_s:.1f}s ago"
    if engine.idle_s < BURST_GAP_S:
        return f"mid-burst (last request {engine.idle_s:.2f}s ago)"
    return None


def decide(loaded: Iterable[Loaded], policy: str = "cost", waited_s: float = 0.0) -> Decision:
    """Which engine makes room, for a load that has waited `waited_s` for memory so far.

    `lru`: the least recently used engine with nothing in flight, else none. `cost`: the
    target is the unprotected, serving engine of lowest `keep_value`; it is unloaded once
    nothing holds it (`_hold`). While its requests or burst hold it the load waits, up to
    PATIENCE_S, then drains it; its minimum residency is always waited out. A more
    valuable engine is never unloaded instead just because it is idle this instant.
    """
    loaded = [e for e in loaded if e.frees_gib > 0]  # a waking engine's: once awake
    if policy == "lru":
        eligible = [e for e in loaded if e.blocked is None]
        victim = max(eligible, key=lambda e: (e.idle_s, e.id), default=None)
        return Decision(victim, "least recently used" if victim else "no idle engine")
    candidates = sorted(
        (e for e in loaded if e.protected is None and (e.ready or e.waking)),
        # Equal value: the one that can go now first.
        key=lambda e: (keep_value(e), _hold(e) is not None, -e.idle_s, e.id),
    )
    ranked = tuple((e.name, round(keep_value(e), 3), _hold(e) or "-") for e in candidates)
    if not candidates:
        return Decision(None, "no engine may be unloaded", ranked=ranked)
    target = candidates[0]
    hold = _hold(target)
    if hold is None:
        return Decision(target, "lowest keep value", ranked=ranked, target=target.name)
    if (
        waited_s >= PATIENCE_S
        and target.ready
        and not target.busy
        and (target.resident_s >= MIN_RESIDENCY_S)
    ):
        reason = f"waited {waited_s:.1f}s ({hold}): draining it"
        return Decision(target, reason, True, ranked, target.name)
    return Decision(None, f"waiting for {target.name}: {hold}", ranked=ranked, target=target.name)


@dataclass(frozen=True)
class Verdict:
    """Whether a model can ever load beside the engines that may not be unloaded."""

    fits: bool
    reason: str = ""


def preflight(
    name: str,
    need_gib: float,
    gpu_count: int,
    free_gib: Mapping[int, float],
    loaded: Iterable[Loaded],
) -> Verdict:
    """Can `name` (needing `need_gib` on each of `gpu_count` GPUs) load once every engine
    that may be unloaded is? Busy engines count as unloadable (their requests end);
    pinned and leased ones do not. A refusal names who holds the memory."""
    loaded = list(loaded)
    possible = dict(free_gib)
    for engine in loaded:
        if engine.protected is None:
            for gpu in engine.gpus:
                if gpu in possible:
                    possible[gpu] += engine.frees_gib
    if sum(1 for gib in possible.values() if gib + 1e-9 >= need_gib) >= gpu_count:
        return Verdict(True)
    holders = sorted(loaded, key=lambda e: (e.protected is None, e.name))
    held = ", ".join(
        f"{e.name} ({e.held_gib:.1f} GiB on GPU {','.join(map(str, e.gpus))}"
        + (f", {e.protected})" if e.protected else ")")
        for e in holders
    )
    free = ", ".join(f"GPU {i}: {gib:.1f} GiB" for i, gib in sorted(free_gib.items()))
    return Verdict(
        False,
        f"model {name!r} needs {need_gib:.1f} GiB on {gpu_count} GPU(s) and cannot fit even "
        f"after every allowed unload (free now: {free or 'no GPU'}; held by: {held or 'nobody'})",
    )


def sleep_level(free_ram_gib: float | None, weights_gib: float | None) -> int:
    """vLLM sleep level: 1 (weights copied to host RAM, the fast wake) when host RAM holds
    them with headroom, else 2 (weights dropped, reloaded on wake). Unknown: 1."""
    if free_ram_gib is None or weights_gib is None:
        return 1
    return 1 if free_ram_gib >= weights_gib + RAM_HEADROOM_GIB else 2


def reload_cost(unload: str, wake_s: float | None, cold_s: float | None) -> float:
    """What bringing an engine back costs: its measured wake (sleep mode) or cold start."""
    if unload == "sleep":
        return wake_s if wake_s is not None else DEFAULT_WAKE_S
    return cold_s if cold_s is not None else DEFAULT_COLD_S
