"""The engine table: the state file, re-read when its mtime changes, plus runtime counters.

The state file is the single source of truth for which engines exist; the
gateway never writes engine records. What it adds per engine (requests in
flight, health, consecutive failures) lives here, in memory, and survives a
re-read as long as the engine keeps its id, URL and pid.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sagellm_cli.core.lifecycle import LIVE, SERVING, Status
from sagellm_cli.core.state import State, StateStore
from sagellm_cli.gateway.loops import every
from sagellm_cli.gateway.routing.backend import Backend
from sagellm_cli.gateway.routing.strategies import Strategy, is_disaggregated, make_strategy

if TYPE_CHECKING:
    from sagellm_cli.gateway.config import GatewayConfig

log = logging.getLogger("sagellm.gateway")


@dataclass
class ModelGroup:
    """All engines reachable under one name, with the healthy subset cached for routing."""

    name: str
    kind: str
    backends: list[Backend]
    strategy: Strategy
    healthy: list[Backend] = field(default_factory=list)
    # A LoRA adapter's group: the engines get this model name (else their served name).
    adapter: str | None = None

    def refresh_healthy(self) -> None:
        """Rebuild the healthy list (only when some engine's health changed)."""
        self.healthy = [b for b in self.backends if b.healthy]


class Registry:
    """Engines and model names, kept in step with the state file."""

    def __init__(self, config: GatewayConfig, store: StateStore | None = None):
        self.config = config
        self.store = store or StateStore()
        self.backends: dict[str, Backend] = {}
        # name -> group, one dict per engine kind so a chat request never reaches an embedder.
        self.groups: dict[str, dict[str, ModelGroup]] = {"llm": {}, "embedding": {}}
        self._strategies: dict[tuple[str, ...], Strategy] = {}
        # The engines' cached blocks, for `kv` routing (followed only when it is used).
        self.kv_index = None
        if "kv" in (config.routing, *config.model_routing.values()):
            from sagellm_cli.gateway.routing.kv_events import KVEventIndex

            self.kv_index = KVEventIndex()
        self._mtime = -1
        self.loaded_at = 0.0
        self.generation = 0

    # -- loading -------------------------------------------------------------

    def load(self, state: State) -> None:
        """Rebuild the table from a state snapshot, keeping counters of unchanged engines."""
        fresh: dict[str, Backend] = {}
        for record in state.engines.values():
            if record.status not in LIVE or record.status == Status.STOPPING:
                continue
            if record.kind not in self.groups:
                continue
            old = self.backends.get(record.id)
            if old is not None and old.same_process(record):
                if record.status != old.record.status and SERVING in (
                    record.status,
                    old.record.status,
                ):
                    # Loaded, woken, unloaded or put to sleep by the lifecycle or supervisor.
                    old.healthy = record.status == SERVING and not old.hung
                    old.draining = False  # a new status: the unload is over
                old.record = record
                old.role = record.role
                fresh[record.id] = old
            else:
                fresh[record.id] = Backend(record)
        self.backends = fresh
        groups: dict[str, dict[str, ModelGroup]] = {"llm": {}, "embedding": {}}
        for backend in sorted(fresh.values(), key=lambda b: (b.record.created_at, b.id)):
            for name in backend.names:
                group = groups[backend.kind].get(name)
                if group is None:
                    group = ModelGroup(
                        name, backend.kind, [], self._strategy_for(backend.kind, name)
                    )
                    groups[backend.kind][name] = group
                group.backends.append(backend)
            # The id always reaches exactly one engine.
            groups[backend.kind][backend.id] = ModelGroup(
                backend.id, backend.kind, [backend], self._strategy_for(backend.kind, backend.id)
            )
        # LoRA adapters are models of their own, on every engine that loaded them; a name
        # that is already another model's stays that model's (`lora add` refuses those).
        for backend in sorted(fresh.values(), key=lambda b: (b.record.created_at, b.id)):
            for name in backend.adapters:
                group = groups[backend.kind].get(name)
                if group is None:
                    strategy = self._strategy_for(backend.kind, name)
                    group = ModelGroup(name, backend.kind, [], strategy, adapter=name)
                    groups[backend.kind][name] = group
                if group.adapter == name:
                    group.backends.append(backend)
        for by_name in groups.values():
            for group in by_name.values():
                if group.adapter is None and is_disaggregated(group.backends):
                    group.strategy = self._strategy_for(group.kind, group.name, "pd")
                group.refresh_healthy()
        self.groups = groups
        self.loaded_at = time.time()
        self.generation += 1

    def _strategy_for(self, kind: str, name: str, routing: str | None = None) -> Strategy:
        # Strategy objects (and their counters) outlive re-reads of the state file.
        key = (kind, name) if routing is None else (kind, name, routing)
        strategy = self._strategies.get(key)
        if strategy is None:
            config = self.config
            strategy = make_strategy(
                routing or config.model_routing.get(name, config.routing),
                prefix_chars=config.prefix_chars,
                prefix_load_factor=config.prefix_load_factor,
                length_threshold_chars=config.length_threshold_chars,
                length_threshold_tokens=config.length_threshold_tokens,
                kv_index=self.kv_index,
                kv_sticky_load_factor=config.kv_sticky_load_factor,
            )
            self._strategies[key] = strategy
        return strategy

    async def refresh(self, force: bool = False) -> bool:
        """Re-read the state file if it changed (the read runs in a thread: it takes a lock)."""
        mtime = self.store.mtime_ns()
        if not force and mtime == self._mtime:
            return False
        state = await asyncio.to_thread(self.store.read)
        self._mtime = mtime
        self.load(state)
        return True

    async def watch(self) -> None:
        """Poll the state file's mtime forever (a bad state file must not kill the gateway)."""
        await every(self.config.state_poll_s, self.refresh, "could not read the state file")

    # -- health --------------------------------------------------------------

    def mark_success(self, backend: Backend) -> None:
        """A request or probe succeeded: reset the failure count, heal if needed.

        An unloaded, sleeping or hung engine stays drained (see Backend.checkable).
        """
        backend.failures = 0
        if not backend.healthy and backend.checkable:
            backend.healthy = True
            backend.last_error = None
            log.warning("engine %s is healthy", backend.id)
            self._health_changed()

    def mark_failure(self, backend: Backend, reason: str, *, fatal: bool = False) -> None:
        """Count a failure; after K in a row (or one `fatal`), stop routing to the engine."""
        backend.failures += 1
        backend.last_error = reason
        if backend.healthy and (fatal or backend.failures >= self.config.failure_threshold):
            backend.healthy = False
            log.warning("engine %s marked unhealthy: %s", backend.id, reason)
            self._health_changed()

    def drain(self, backend: Backend, *, hung: bool = False) -> None:
        """Stop routing to an engine the supervisor unloads or found hung."""
        backend.hung = backend.hung or hung
        backend.draining = not hung
        if backend.healthy:
            backend.healthy = False
            self._health_changed()

    def _health_changed(self) -> None:
        for by_name in self.groups.values():
            for group in by_name.values():
                group.refresh_healthy()

    # -- lookups ---------------------------------------------------------------

    def group(self, kind: str, name: str) -> ModelGroup | None:
        """The group serving `name` for engines of `kind`."""
        return self.groups[kind].get(name)

    def other_kind(self, kind: str, name: str) -> str | None:
        """The other engine kind that serves `name`, if any (for a helpful 400)."""
        for other, by_name in self.groups.items():
            if other != kind and name in by_name:
                return other
        return None

    def model_names(self, kind: str | None = None) -> list[str]:
        """Served model names (not aliases), for error messages and /v1/models."""
        names: dict[str, None] = {}
        for backend in self.backends.values():
            if kind is None or backend.kind == kind:
                names[backend.served_model_name] = None
        return list(names)

    def default_group(self, kind: str) -> ModelGroup | None:
        """The only model of `kind`, for requests that omit `model`."""
        names = self.model_names(kind)
        return self.groups[kind].get(names[0]) if len(names) == 1 else None

    def listed_names(self, kind: str) -> list[str]:
        """What `/v1/models` lists for `kind`: every served name and label the gateway routes
        (the name a user sends is a name they see), in engine order."""
        names: dict[str, None] = {}
        for backend in self.backends.values():
            if backend.kind == kind:
                names[backend.served_model_name] = None
                if backend.record.label:
                    names[backend.record.label] = None
        return list(names)

    def models_document(self) -> dict:
        """The `/v1/models` body: each routable name with the engines behind it, their ids
        as `owned_by` and the served model as `root` (vLLM's field for the base model);
        LoRA adapters also name it as `parent`, as vLLM's own list does."""
        data = []
        for kind, by_name in self.groups.items():
            for name in self.listed_names(kind):
                data.append(_model_entry(name, by_name[name]))
            for group in by_name.values():
                if group.adapter is not None:
                    entry = _model_entry(group.name, group)
                    data.append({**entry, "parent": entry["root"], "aliases": []})
        return {"object": "list", "data": data}

    def any_ready(self) -> bool:
        """True while at least one engine is healthy."""
        return any(b.healthy for b in self.backends.values())


def _model_entry(name: str, group: ModelGroup) -> dict:
    """One `/v1/models` entry: the name, the engines behind it and their other names."""
    return {
        "id": name,
        "object": "model",
        "created": int(min(b.record.created_at for b in group.backends)),
        "owned_by": ",".join(b.id for b in group.backends),
        "root": group.backends[0].served_model_name,
        "kind": group.kind,
        "ready": bool(group.healthy),
        "engines": [
            {
                "id": b.id,
                "label": b.record.label,
                "url": b.url,
                "role": b.role,
                "healthy": b.healthy,
            }
            for b in group.backends
        ],  # fmt: skip
        "aliases": sorted({n for b in group.backends for n in b.names if n != name}),
    }
