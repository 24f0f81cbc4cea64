"""The launcher of external engines: servers something else runs, registered by URL.

Registration itself (checking the URL, recording the engine) is core/engines/external.py; this
launcher only answers for such records: nothing to spawn, signal or clean.
"""

from __future__ import annotations

from pathlib import Path

from sagellm_cli.core.errors import BadInput, ResourceUnavailable
from sagellm_cli.core.launchers.process import ProcessHandle
from sagellm_cli.core.records import EngineRecord, EngineSpec

NODE_PREFIX = "external:"


class ExternalLauncher:
    """The launcher of engines something else runs: nothing to spawn, signal or clean."""

    on_this_machine = False  # health checks over the network judge it

    def __init__(self, node: str):
        self.node = node

    def allocate_port(self, host, taken) -> int:
        raise BadInput("external engines are registered, not started", hint=_HINT)

    check_port = allocate_port

    def engine_host(self, spec: EngineSpec) -> str:
        return spec.host

    def place(self, spec, runtime, state, live):
        raise BadInput("external engines are registered, not started", hint=_HINT)

    def scratch_dir(self, engine_id: str) -> Path:
        raise BadInput("external engines have no scratch space", hint=_HINT)

    def spawn(self, engine_id, argv, env, log_path) -> ProcessHandle:
        raise ResourceUnavailable("external engines are registered, not started", hint=_HINT)

    def is_alive(self, record: EngineRecord) -> bool:
        """Always: only health checks can tell, and they drain it like any engine."""
        return True

    def has_leftovers(self, record: EngineRecord) -> bool:
        return False

    def terminate(self, record: EngineRecord, timeout: float) -> int:
        """Never signals anything: stopping an external engine only unregisters it."""
        return 0

    def exit_code(self, record: EngineRecord) -> int | None:
        return None

    def wait_port_free(self, record: EngineRecord, timeout: float = 5.0) -> None:
        return None

    def cleanup(self, record: EngineRecord, *, forget: bool = False) -> None:
        return None


_HINT = "use `sage llm engine register URL --model NAME`"
