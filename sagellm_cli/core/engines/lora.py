"""LoRA adapters of vLLM engines, loaded and unloaded while the engine runs.

An adapter is loaded through vLLM's `/v1/load_lora_adapter` (the engine must have been
started with LoRA support: `enable_lora`, which also sets VLLM_ALLOW_RUNTIME_LORA_UPDATING)
and recorded in the engine's spec (`lora_adapters`, name -> path) through the state file,
so that a restart passes it to vLLM's `--lora-modules` and it is loaded again before the
engine is `ready`. The gateway routes the adapter's name to the engines that hold it.
"""

from __future__ import annotations

import http.client
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sagellm_cli.core import protocol
from sagellm_cli.core.engines import probe
from sagellm_cli.core.errors import BadInput, NotFound, OperationFailed
from sagellm_cli.core.launchers.base import launcher_for
from sagellm_cli.core.records import NAME_PATTERN, EngineRecord

if TYPE_CHECKING:
    from sagellm_cli.core.engines.manager import EngineManager

LOAD_PATH = protocol.LORA_LOAD
UNLOAD_PATH = protocol.LORA_UNLOAD
# Statuses in which the engine's process serves requests: the adapter is (un)loaded now.
# In the others that are live but without a serving process (idle, restarting), only
# the record changes, and the next start loads what it lists.
_SERVING = ("ready", "unhealthy")
_NO_PROCESS = ("idle", "restarting")
LOAD_TIMEOUT_S = 120.0


@dataclass
class Adapter:
    """One adapter of an engine: its name (the model name requests use), path, and whether
    the engine lists it now (None: the engine was not asked, e.g. it is idle)."""

    name: str
    path: str
    loaded: bool | None = None

    def to_dict(self) -> dict:
        """A plain dict for `--json`."""
        return {"name": self.name, "path": self.path, "loaded": self.loaded}


def list_adapters(manager: EngineManager, ref: str) -> tuple[EngineRecord, list[Adapter]]:
    """The engine and its recorded adapters, each marked loaded or not by its /v1/models."""
    record = manager.get(ref, probe_health=False)
    loaded = _loaded(record) if record.status in _SERVING else None
    adapters = [
        Adapter(name, path, None if loaded is None else name in loaded)
        for name, path in record.spec.lora_adapters.items()
    ]
    return record, adapters


def add_adapter(manager: EngineManager, ref: str, name: str, path: str) -> EngineRecord:
    """Load adapter `name` from `path` into engine `ref` and record it; the updated record.

    Adding the same name with the same path again is a no-op; another path is BadInput.
    """
    record = _lora_engine(manager, ref)
    if not re.match(NAME_PATTERN, name):
        raise BadInput(
            f"adapter name {name!r} is not valid",
            hint="use letters, digits, '.', '_' and '-', starting with a letter or digit",
        )
    path = _adapter_path(record, path)
    current = record.spec.lora_adapters.get(name)
    if current is not None:
        if current == path:
            return record
        raise BadInput(
            f"engine {record.id} already has adapter {name!r} (from {current})",
            hint=f"remove it first: sage llm engine lora remove {record.id} {name}",
        )
    _check_name_free(manager, record, name)
    if record.status in _SERVING:
        _call(record, LOAD_PATH, {"lora_name": name, "lora_path": path}, f"load adapter {name!r}")
    return _record(manager, record.id, name, path)


def remove_adapter(manager: EngineManager, ref: str, name: str) -> EngineRecord:
    """Unload adapter `name` from engine `ref` and drop it from the record."""
    record = manager.get(ref, probe_health=False)
    if name not in record.spec.lora_adapters:
        raise NotFound(
            f"engine {record.id} has no adapter {name!r}",
            hint=f"see `sage llm engine lora list {record.id}`",
        )
    if record.status in _SERVING:
        # vLLM's 404: not loaded (the engine restarted without it, say); the record goes.
        _call(record, UNLOAD_PATH, {"lora_name": name}, f"unload adapter {name!r}", ok=(404,))
    return _record(manager, record.id, name, None)


# -- helpers ---------------------------------------------------------------------------


def _lora_engine(manager: EngineManager, ref: str) -> EngineRecord:
    """The engine `ref`, if adapters can be added to it now."""
    record = manager.get(ref, probe_health=False)
    if not record.spec.lora:
        raise BadInput(
            f"engine {record.id} was started without LoRA support",
            hint="start it with --enable-lora (and --max-lora-rank for ranks above 16)",
        )
    if not record.is_live:
        raise BadInput(
            f"engine {record.id} is {record.status}",
            hint=f"start it again first: sage llm engine restart {record.id}",
        )
    if record.status not in _SERVING + _NO_PROCESS:
        raise OperationFailed(
            f"engine {record.id} is {record.status}",
            hint="try again once `sage llm engine list` shows it ready",
        )
    return record


def _adapter_path(record: EngineRecord, path: str) -> str:
    """An absolute path vLLM can read: checked here when the engine runs on this machine."""
    if not path:
        raise BadInput("the adapter PATH is empty", hint="give the adapter's directory")
    if not launcher_for(record.node).on_this_machine:
        return path  # a path on the engine's node: vLLM checks it
    resolved = Path(path).expanduser().resolve()
    if not (resolved / "adapter_config.json").is_file():
        raise BadInput(
            f"{path} is not a LoRA adapter (no adapter_config.json)",
            hint="give the directory PEFT saved the adapter to",
        )
    return str(resolved)


def _check_name_free(manager: EngineManager, record: EngineRecord, name: str) -> None:
    """An adapter name must not be another model's name: requests would be ambiguous."""
    for other in manager.list():
        if name in (other.id, other.served_model_name, other.label, other.model):
            raise BadInput(
                f"{name!r} already names engine {other.id} or its model",
                hint="choose another adapter name",
            )


def _call(record: EngineRecord, path: str, body: dict, what: str, ok: tuple[int, ...] = ()) -> None:
    """POST to the engine; OperationFailed with its own message unless it answers 200."""
    try:
        status, data = probe.post_json(record.url, path, body, LOAD_TIMEOUT_S)
    except (OSError, http.client.HTTPException) as exc:
        raise OperationFailed(
            f"could not {what} on engine {record.id}: {exc}",
            hint=f"check `sage llm engine logs {record.id}`",
        ) from None
    if status == 200 or status in ok:
        return
    if status == 404 and path == LOAD_PATH and b"Not Found" in data[:40]:
        raise OperationFailed(
            f"engine {record.id} does not serve {path}",
            hint="it must run with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True: restart it",
        )
    raise OperationFailed(
        f"engine {record.id} could not {what}: {_message(data)}",
        hint=f"check the adapter (its rank must be <= max_lora_rank; "
        f"`sage llm engine logs {record.id}`)",
    )


def _message(data: bytes) -> str:
    """The engine's error message (vLLM's OpenAI-shaped body), else its raw text."""
    try:
        body = json.loads(data)
        return str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return data.decode("utf-8", "replace")[:200]


def _loaded(record: EngineRecord) -> set[str] | None:
    """The adapter names the engine's /v1/models lists (None if it does not answer)."""
    try:
        status, data = probe.get(record.url, protocol.MODELS, 5.0)
        if status != 200:
            return None
        models = json.loads(data).get("data", [])
    except (OSError, http.client.HTTPException, ValueError, AttributeError):
        return None
    return {m.get("id") for m in models if m.get("parent")}


def _record(manager: EngineManager, engine_id: str, name: str, path: str | None) -> EngineRecord:
    """Record (path) or forget (None) adapter `name` in the engine's spec, under the lock."""
    with manager.store.transaction() as state:
        record = state.engines.get(engine_id)
        if record is None:
            raise NotFound(f"engine {engine_id} is gone", hint="see `sage llm engine list`")
        if path is None:
            record.spec.lora_adapters.pop(name, None)
        else:
            record.spec.lora_adapters[name] = path
        return record
