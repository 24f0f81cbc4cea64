"""Where sagellm keeps its state, logs and model cache."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def engine_python() -> str:
    """The interpreter that runs engines and model conversions (`SAGELLM_ENGINE_PYTHON`
    overrides): the one that has torch, transformers and vLLM."""
    import sys

    return os.environ.get("SAGELLM_ENGINE_PYTHON") or sys.executable


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


# A folder in the state dir when the one in the system temp dir is not ours. Short:
# an engine's TMPDIR holds vLLM's unix sockets, whose paths must stay under ~107 bytes.
FALLBACK_SCRATCH = "tmp"


def _private_root(root: Path, *, create: bool) -> bool:
    """True if `root` is a real directory (not a symlink) of this user, mode 0700."""
    try:
        if create:
            try:
                root.mkdir(mode=0o700)
                os.chmod(root, 0o700)  # mkdir's mode is filtered by the umask
            except FileExistsError:
                pass  # checked below: it may belong to someone else
        info = root.lstat()
    except OSError:
        return False
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.getuid()
        and stat.S_IMODE(info.st_mode) == 0o700
    )


def _scratch_roots() -> tuple[Path, Path]:
    import tempfile

    shared = Path(tempfile.gettempdir()) / f"sagellm-{os.getuid()}"
    return shared, state_dir() / FALLBACK_SCRATCH


def scratch_dir(engine_id: str) -> Path:
    """An engine's TMPDIR: short, because vLLM puts unix sockets there (max ~107 bytes).

    It lives in `<system temp dir>/sagellm-<uid>` when that is a private folder of this
    user; if another user made it (or a symlink, or it is not 0700), in
    `<state dir>/tmp` instead, so that nobody else can plant or read files in it.
    """
    shared, fallback = _scratch_roots()
    if _private_root(shared, create=True):
        return shared / engine_id
    ensure_private_dir(fallback.parent)
    if _private_root(fallback, create=True):
        return fallback / engine_id
    from sagellm_cli.core.errors import OperationFailed

    raise OperationFailed(
        f"no private scratch directory: neither {shared} nor {fallback} is a 0700 folder "
        "of this user",
        hint=f"remove {fallback} or chmod 700 it",
    )


def scratch_dirs(engine_id: str) -> list[Path]:
    """Every place an engine's TMPDIR may be, for clean-up; creates and follows nothing."""
    return [root / engine_id for root in _scratch_roots() if _private_root(root, create=False)]


def private_cache_dir(engine_id: str) -> Path:
    """A `cache: private` engine's own vLLM cache (compile artefacts), kept across restarts."""
    return state_dir() / "cache" / "vllm" / engine_id


def models_dir() -> Path:
    """The local model cache (`sage llm model`)."""
    return state_dir() / "models"


def check_owned(path: Path, info: os.stat_result, *, private: bool) -> None:
    """Refuse (exit 2) a file or folder of another user, or one others may write to
    (with `private`, also read): a token or state others control is never used."""
    from sagellm_cli.core.errors import BadInput

    uid = os.getuid()
    if info.st_uid != uid:
        raise BadInput(
            f"{path} belongs to uid {info.st_uid}, not to you (uid {uid}); sagellm does not "
            "trust files others control",
            hint=f"if it is yours: chown {uid} {path}; else remove it or set SAGELLM_HOME",
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & (0o077 if private else 0o022):
        what = "readable or writable" if private else "writable"
        fix = "chmod 600" if private else "chmod go-w"
        raise BadInput(
            f"{path} is {what} by group or others (mode {mode:04o}); sagellm does not "
            "trust files others could have changed",
            hint=f"{fix} {path} if its contents are yours, else remove it",
        )


def trusted_dir(path: Path) -> Path:
    """`path`, created 0700 if missing; else refused unless it is a folder of this user
    that group and others cannot write (trust on first use, checked every use)."""
    from sagellm_cli.core.errors import BadInput

    try:
        path.mkdir(mode=0o700)
        os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask
        return path
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return trusted_dir(path)
    except FileExistsError:
        pass
    except OSError as exc:
        raise BadInput(f"cannot create {path}: {exc.strerror}", hint="set SAGELLM_HOME") from None
    info = path.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise BadInput(f"{path} is not a directory", hint="remove it or set SAGELLM_HOME")
    check_owned(path, info, private=False)
    return path


def trusted_state_dir() -> Path:
    """The state directory, created or checked (see trusted_dir)."""
    return trusted_dir(state_dir())


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (mode 0700) if missing and return it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path
