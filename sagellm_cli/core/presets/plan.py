"""Planning a preset: every engine's model, port, GPUs and command, before anything starts.

The plan is computed on a reconciled *copy* of the state; nothing is written, so a dry
run leaves the state file byte-for-byte unchanged.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sagellm_cli.core import paths
from sagellm_cli.core.credentials import redact_argv, redact_env
from sagellm_cli.core.errors import BadInput, SageError
from sagellm_cli.core.launchers import ports
from sagellm_cli.core.lifecycle import Status
from sagellm_cli.core.presets.loader import LoadedPreset
from sagellm_cli.core.presets.schema import EngineConfig, PresetConfig
from sagellm_cli.core.records import EXTERNAL, NIXL, EngineRecord, EngineSpec, option_fields
from sagellm_cli.core.state import State

if TYPE_CHECKING:
    from sagellm_cli.core.engines.manager import EngineManager
    from sagellm_cli.core.gpu import Inventory, Placement

# Actions an apply takes per engine.
START, KEEP, REPLACE, RESTART = "start", "keep", "replace", "restart"
# Spec fields that don't make a running engine different from the file.
_IGNORED_WHEN_COMPARING = ("port",)
ENGINE_ID_PLACEHOLDER = "<engine-id>"


# --------------------------------------------------------------------------- models


@dataclass
class ModelInfo:
    """How a model name in a preset resolves on this machine."""

    name: str
    argument: str  # what the engine is given as --model
    path: str | None
    source: str
    exists_locally: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def resolve_model(model: str) -> ModelInfo:
    """Where `model` loads from (sagellm's model cache, a path, packaged MiniLM, the HF cache,
    else the hub). A path is shown as given even when missing: the plan marks it."""
    from sagellm_cli.core.models import cache as model_cache

    if model_cache.is_path(model):
        path = Path(model).expanduser()
        return ModelInfo(model, model, str(path), "local-path", path.exists())
    resolved = model_cache.resolve_model(model)
    return ModelInfo(
        model,
        resolved.argument,
        resolved.path,
        resolved.source,
        resolved.exists_locally,
    )


def _offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


# --------------------------------------------------------------------------- plan


@dataclass
class PlannedEngine:
    """One engine (one replica) of the preset and what apply will do with it."""

    engine: str
    replica: int
    replicas: int
    label: str
    spec: EngineSpec
    runtime: str
    model: ModelInfo
    port: int
    action: str
    argv: list[str]
    env: dict[str, str]
    placement: Placement | None = None
    existing_id: str | None = None
    existing_status: str | None = None
    gpus: list[int] = field(default_factory=list)
    gib_per_gpu: float | None = None
    notes: list[str] = field(default_factory=list)
    # Why this engine can't start yet (a model to prepare, no room on a GPU); the plan still
    # shows it, and apply refuses with `blocker_error` (its exit code) before starting any.
    blocker: str | None = None
    blocker_error: SageError | None = field(default=None, repr=False)
    # An external engine (`url:` in the preset): registered, not started.
    url: str | None = None

    def to_dict(self) -> dict[str, Any]:
        import shlex

        return {
            "engine": self.engine,
            "replica": self.replica,
            "label": self.label,
            "kind": self.spec.kind,
            "runtime": self.runtime,
            "model": self.model.to_dict(),
            "served_model_name": self.spec.served_model_name,
            "role": self.spec.role,
            "port": self.port,
            "host": self.spec.host,
            "gpus": self.gpus,
            "gib_per_gpu": self.gib_per_gpu,
            "placement": self.placement.to_dict() if self.placement else None,
            "action": self.action,
            "existing_id": self.existing_id,
            "existing_status": self.existing_status,
            "command": redact_argv(self.argv),
            "command_line": shlex.join(redact_argv(self.argv)),
            "env": redact_env(self.env),
            "notes": self.notes,
            "blocker": self.blocker,
            "url": self.url,
            "spec": self.spec.public_dict(),
        }


@dataclass
class PresetPlan:
    """Everything apply will do, computed before it does any of it."""

    preset: str
    file: str
    description: str
    engines: list[PlannedEngine]
    remove: list[EngineRecord]

    @property
    def to_start(self) -> list[PlannedEngine]:
        return [e for e in self.engines if e.action in (START, RESTART, REPLACE)]

    def check_startable(self) -> None:
        """Raise for the first engine that can't start (a model to prepare: exit 2; no GPU
        or no room: exit 4), naming it, before anything is stopped or started."""
        blocked = [e for e in self.to_start if e.blocker]
        if blocked:
            first = blocked[0]
            raise first.blocker_error or BadInput(f"engine {first.label!r}: {first.blocker}")

    def check_placeable(self) -> None:
        """Raise for the first engine this machine cannot place (no GPU, no room, a port
        taken); a model still to prepare is not such a failure."""
        for engine in self.to_start:
            if engine.blocker_error is not None:
                raise engine.blocker_error

    @property
    def noop(self) -> bool:
        """Already fully up: every engine kept and ready, nothing to remove."""
        return (
            not self.to_start
            and not self.remove
            and all(e.existing_status == Status.READY for e in self.engines)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "file": self.file,
            "description": self.description,
            "noop": self.noop,
            "startable": not any(e.blocker for e in self.to_start),
            "engines": [e.to_dict() for e in self.engines],
            "remove": [
                {"id": r.id, "label": r.label, "model": r.model, "port": r.port}
                for r in self.remove
            ],
        }


def _engine_error(exc: SageError, label: str) -> SageError:
    """The same kind of error (same exit code), naming the engine."""
    return type(exc)(f"engine {label!r}: {exc.message}", hint=exc.hint, details=exc.details)


def _same_spec(recorded: EngineSpec, wanted: EngineSpec) -> bool:
    want, have = wanted.to_dict(), recorded.to_dict()
    for key in _IGNORED_WHEN_COMPARING:
        if want.get(key) is None:
            want.pop(key, None)
            have.pop(key, None)
    return want == have


def _spec_for(cfg: EngineConfig, preset: str, replica: int, model: ModelInfo) -> EngineSpec:
    # Every option maps one to one (the preset schema is derived from EngineSpec);
    # only what depends on the replica or the resolved model is filled in here.
    options = cfg.model_dump(include=set(option_fields()))
    options.update(
        model=model.argument,
        port=cfg.engine_port(replica),
        label=cfg.engine_label(preset, replica),
        served_model_name=cfg.served_model_name or cfg.model,
    )
    return EngineSpec(**options, preset=preset, preset_engine=cfg.name)


def _check_model(model: ModelInfo, kind: str, label: str) -> tuple[list[str], str | None]:
    """Notes for a doubtful model, and what blocks a start (a model still to prepare).

    A path that does not exist is a mistake in the file: BadInput (exit 2) at once.
    """
    if model.exists_locally:
        return [], None
    if model.source == "local-path":
        raise BadInput(
            f"engine {label!r}: model path {model.name} does not exist",
            hint="fix `model:` in the preset, or prepare the model first",
        )
    if kind == "llm" and "/" not in model.name:
        blocker = (
            f"model {model.name!r} is not in the local model cache: prepare it first "
            "(`sage llm model prepare-demo` for gemma-3-270m), or use a path or a Hugging Face id"
        )
        return [f"cannot start yet: {blocker}"], blocker
    if _offline():
        return [
            f"{model.name} is not available locally and downloads are off (HF_HUB_OFFLINE)"
        ], None
    return [f"{model.name} is not available locally; the engine will download it"], None


def make_plan(
    preset: LoadedPreset,
    manager: EngineManager,
    *,
    state: State | None = None,
    inventory: Inventory | None = None,
) -> PresetPlan:
    """Plan every engine of `preset` against the current (reconciled) state, writing nothing.

    Raises BadInput (exit 2) or ResourceUnavailable (exit 4) naming the engine at fault.
    """
    config = preset.config
    state = state if state is not None else manager.snapshot()
    planned, live = _decide_actions(config, state)
    labels = {p.label for p in planned}
    remove = [r for r in live.values() if r.label not in labels]
    going = {p.existing_id for p in planned if p.action == REPLACE} | {r.id for r in remove}
    _place(planned, state, going, inventory, preset)
    return PresetPlan(
        preset=config.name,
        file=str(preset.path),
        description=config.description,
        engines=planned,
        remove=remove,
    )


def _decide_actions(
    config: PresetConfig, state: State
) -> tuple[list[PlannedEngine], dict[str, EngineRecord]]:
    """Pass 1: every replica's model, spec and action (start, keep, replace, restart).

    Also returns the preset's live engines by label (those missing from the file go).
    """
    from sagellm_cli.core.engines.manager import validate_spec

    name = config.name
    ours = [r for r in state.engines.values() if r.preset == name]
    live = {r.label: r for r in ours if r.is_live and r.label}
    dead = {
        r.label: r for r in sorted(ours, key=lambda r: r.created_at) if not r.is_live and r.label
    }
    others = {
        r.label: r for r in state.engines.values() if r.is_live and r.label and r.preset != name
    }
    models: dict[str, ModelInfo] = {}
    planned: list[PlannedEngine] = []
    for cfg in config.engines:
        if cfg.url is not None:
            planned.append(_plan_external(cfg, name, live, dead, others))
            continue
        model = models.get(cfg.model) or models.setdefault(cfg.model, resolve_model(cfg.model))
        for replica in range(1, cfg.replicas + 1):
            label = cfg.engine_label(name, replica)
            if label in others:
                other = others[label]
                raise BadInput(
                    f"engine {label!r}: label is used by running engine {other.id}"
                    + (f" of preset {other.preset!r}" if other.preset else ""),
                    hint="set another `label:` in the preset or stop that engine",
                )
            spec = _spec_for(cfg, name, replica, model)
            try:
                runtime = validate_spec(spec)
            except SageError as exc:
                raise _engine_error(exc, label) from None
            existing = live.get(label)
            if existing is not None:
                action = KEEP if _same_spec(existing.spec, spec) else REPLACE
            elif label in dead:
                action, existing = RESTART, dead[label]
            else:
                action = START
            kept = action == KEEP
            planned.append(
                PlannedEngine(
                    engine=cfg.name,
                    replica=replica,
                    replicas=cfg.replicas,
                    label=label,
                    spec=spec,
                    runtime=runtime,
                    model=model,
                    port=existing.port if kept else 0,
                    action=action,
                    argv=list(existing.command) if kept else [],
                    env={},
                    existing_id=existing.id if existing else None,
                    existing_status=existing.status if existing else None,
                    gpus=list(existing.gpus) if kept else [],
                    gib_per_gpu=existing.gpu_memory_gb if kept else None,
                )
            )
            if not kept:
                planned[-1].notes, planned[-1].blocker = _check_model(model, cfg.kind, label)
    return planned, live


def _plan_external(cfg: EngineConfig, preset: str, live, dead, others) -> PlannedEngine:
    """An engine given by `url:`: kept while its record points at the same server."""
    from sagellm_cli.core.engines.external import normalise_url

    label = cfg.engine_label(preset, 1)
    try:
        url = normalise_url(cfg.url)
    except SageError as exc:
        raise _engine_error(exc, label) from None
    if label in others:
        raise BadInput(f"engine {label!r}: label is used by running engine {others[label].id}")
    model_name = cfg.served_model()
    spec = EngineSpec(
        model=model_name or "", kind=cfg.kind, runtime=EXTERNAL, label=label, role=cfg.role,
        max_inflight=cfg.max_inflight, cost_per_1k_tokens=cfg.cost_per_1k_tokens,
        preset=preset, preset_engine=cfg.name,
    )  # fmt: skip
    existing = live.get(label)
    if existing is not None:
        same = existing.base_url == url and model_name in (None, existing.model)
        same = same and _same_spec(existing.spec, dataclasses.replace(spec, model=existing.model))
        action = KEEP if same else REPLACE
    else:
        action = START
    model = ModelInfo(model_name or "(the server's only model)", "", None, EXTERNAL, True)
    return PlannedEngine(
        engine=cfg.name, replica=1, replicas=1, label=label, spec=spec, runtime=EXTERNAL,
        model=model, port=urlsplit(url).port or 0, action=action, argv=[], env={},
        existing_id=existing.id if existing else None,
        existing_status=existing.status if existing else None,
        notes=[f"registered at {url}, not started here (external)"], url=url,
    )  # fmt: skip


def _gpu_for(
    item: PlannedEngine, state: State, inventory: Inventory, preset: LoadedPreset
) -> Placement | None:
    """GPUs for one engine. A built-in preset's `use_gpu: true` is a preference: without a
    GPU the engine runs on the CPU, said in a note. A user's own is strict, and the error
    names the preset field to change."""
    from sagellm_cli.core.errors import ResourceUnavailable
    from sagellm_cli.core.gpu import plan_gpu

    spec = item.spec
    if spec.use_gpu and not inventory.available:
        reason = inventory.reason or "no usable GPU"
        if preset.builtin:
            item.spec = dataclasses.replace(spec, use_gpu=False)
            item.notes.append(f"no GPU here ({reason}): runs on the CPU instead")
            return None
        raise ResourceUnavailable(
            f"no GPU available: {reason}",
            hint=f"the preset asks `use_gpu: true` for engine {item.engine!r}: remove it to "
            f"run on the CPU ({preset.path}), or set SAGELLM_MOCK_GPUS=1x80 to test placement",
        )
    return plan_gpu(spec, state, inventory=inventory)


def _place(
    planned: list[PlannedEngine],
    state: State,
    going: set[str],
    inventory: Inventory | None,
    preset: LoadedPreset,
) -> None:
    """Pass 2: ports, GPUs and command lines, cumulatively across the preset.

    Engines that the apply stops (`going`) free their port and GPU memory for the new ones.
    An engine that can't be placed gets a blocker and the others are still planned.
    """
    from sagellm_cli.core.gpu import engine_pid_map, read_inventory
    from sagellm_cli.core.launchers.ray import cluster_address
    from sagellm_cli.core.launchers.runtimes import build_launch

    for engine_id in going:
        state.release(engine_id)
    freed_ports = {state.engines[i].port for i in going}
    taken = state.taken_ports(exclude=going)
    scratch = paths.scratch_dir(ENGINE_ID_PLACEHOLDER)
    for item in planned:
        if item.action == KEEP or item.url is not None:
            continue  # kept as it runs, or external (nothing to place)
        spec = item.spec
        if cluster_address(spec):  # a Ray node gives port and GPUs at start (docs/cluster.md)
            item.port = spec.port  # type: ignore[assignment]  # None: a free port on the node
            item.notes.append(f"placed on a node of the Ray cluster {cluster_address(spec)}")
            continue
        try:
            if spec.port is not None:
                # A port held by an engine this apply stops is free by the time it starts.
                if spec.port in taken or spec.port not in freed_ports:
                    ports.check_requested_port(spec.host, spec.port, taken)
                port = spec.port
            else:
                port = ports.allocate_port(spec.host, taken | freed_ports)
            taken.add(port)
            # The KV-event publisher's port and NixlConnector's side channel, as spawn
            # allocates them.
            events_port = nixl_port = None
            if spec.kv_events:
                events_port = ports.allocate_port(spec.host, taken | freed_ports)
                taken.add(events_port)
            if spec.kv_connector == NIXL:
                nixl_port = ports.allocate_port(spec.host, taken | freed_ports)
                taken.add(nixl_port)
            placement = None
            if spec.wants_gpu() is not False:
                if inventory is None:
                    inventory = read_inventory(engine_pid_map(state))
                placement = _gpu_for(item, state, inventory, preset)
                spec = item.spec
        except SageError as exc:
            item.blocker_error = _engine_error(exc, item.label)
            item.blocker = exc.one_line()
            item.notes.append(f"cannot start: {item.blocker}")
            continue
        if placement is not None:
            state.reservations[f"planned:{item.label}"] = placement.reservation(item.label)
            item.gpus, item.gib_per_gpu = list(placement.gpus), placement.gib_per_gpu
            estimate = placement.estimate
            if estimate is not None and estimate.params_source == "unknown":
                item.notes.extend(estimate.notes)  # the conservative default, said out loud
        item.placement, item.port = placement, port
        launch = build_launch(
            spec,
            runtime=item.runtime,
            port=port,
            served_model_name=spec.served_model_name or spec.model,
            placement=placement,
            kv_events_port=events_port,
            nixl_port=nixl_port,
            scratch_dir=scratch,
            cache_dir=paths.private_cache_dir(ENGINE_ID_PLACEHOLDER)
            if spec.cache == "private"
            else None,
        )
        item.argv = launch.argv
        item.env = {**spec.env, **launch.env}
        item.notes.extend(launch.notes)
