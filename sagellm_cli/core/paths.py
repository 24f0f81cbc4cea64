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
    """Per-engine run files: exit codes."""
    return state_dir() / "run"


def scratch_dir(engine_id: str) -> Path:
    """An engine's TMPDIR: short, because vLLM puts unix sockets there (max ~107 bytes).

    It lives under the system temp dir, in a folder of this user only.
    """
    import tempfile

    root = Path(tempfile.gettempdir()) / f"sagellm-{os.getuid()}"
    root.mkdir(mode=0o700, exist_ok=True)
    info = root.lstat()
    if info.st_uid != os.getuid() or not root.is_dir() or root.is_symlink():
        raise PermissionError(f"{root} is not a private directory of this user")
    return root / engine_id


def models_dir() -> Path:
    """The local model cache (`sage llm model`)."""
    return state_dir() / "models"


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (mode 0700) if missing and return it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path
