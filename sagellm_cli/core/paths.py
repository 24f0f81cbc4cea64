"""Where sagellm keeps its state, logs and model cache."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    """`$SAGELLM_HOME`, else `$XDG_STATE_HOME/sagellm`, else `~/.local/state/sagellm`."""
    home = os.environ.get("SAGELLM_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "sagellm"
    return Path.home() / ".local" / "state" / "sagellm"


def state_file() -> Path:
    """The single JSON state file: engines, GPU reservations, presets, gateway."""
    return state_dir() / "state.json"


def logs_dir() -> Path:
    """Engine logs, one `<engine id>.log` each."""
    return state_dir() / "logs"


def run_dir() -> Path:
    """Per-engine scratch: exit-code files, TMPDIR for vLLM."""
    return state_dir() / "run"


def models_dir() -> Path:
    """The local model cache (`sage llm model`)."""
    return state_dir() / "models"


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (mode 0700) if missing and return it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path
