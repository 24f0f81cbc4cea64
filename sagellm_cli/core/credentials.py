"""Credentials: the gateway's admin token file, and keeping secrets out of engines and output.

The admin token guards everything that can start a process (the management API). It is
created once, at random, in the private state directory, so that local tools read it
from there and nothing on the machine reaches the control surface without it.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from pathlib import Path

from sagellm_cli.core import paths
from sagellm_cli.core.errors import BadInput

ADMIN_TOKEN_ENV = "SAGELLM_ADMIN_TOKEN"
API_KEY_ENV = "SAGELLM_API_KEY"
# The gateway's own credentials: never handed to an engine process.
GATEWAY_SECRETS = (ADMIN_TOKEN_ENV, API_KEY_ENV)
MASK = "***"

# Environment an engine may get from a management API request (without
# --allow-remote-engine-config), and whose values output shows. Everything else
# (LD_*, PYTHON*, BROWSER, VLLM_PLUGINS, logging config paths, ...) can run code.
SAFE_ENV_PREFIXES = ("HF_", "CUDA_", "NCCL_", "OMP_")
SAFE_ENV_KEYS = frozenset(
    {
        "TOKENIZERS_PARALLELISM",
        "PYTORCH_CUDA_ALLOC_CONF",
        "TRANSFORMERS_OFFLINE",
        # vLLM tuning knobs; none of them loads code or a file.
        "VLLM_ATTENTION_BACKEND",
        "VLLM_CPU_KVCACHE_SPACE",
        "VLLM_CPU_OMP_THREADS_BIND",
        "VLLM_ENABLE_V1_MULTIPROCESSING",
        "VLLM_WORKER_MULTIPROC_METHOD",
        "VLLM_LOGGING_LEVEL",
        "VLLM_USE_FLASHINFER_SAMPLER",
        "VLLM_ALLOW_LONG_MAX_MODEL_LEN",
        "VLLM_FLASH_ATTN_VERSION",
        "VLLM_ENGINE_ITERATION_TIMEOUT_S",
        "VLLM_RPC_TIMEOUT",
        "VLLM_SLEEP_WHEN_IDLE",
        "VLLM_DISABLE_COMPILE_CACHE",
    }
)
# What sagellm itself sets for an engine: shown in output although the API can't set it.
SAGELLM_SET_ENV = frozenset({"TMPDIR", "VLLM_CACHE_ROOT", "PYTHONUNBUFFERED", "SAGELLM_ENGINE_ID"})
_SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.I)


def is_secret_name(name: str) -> bool:
    """True for names that look like they hold a secret (`HF_TOKEN`, `--api-key`)."""
    return bool(_SECRET_NAME.search(name))


def env_allowed_remotely(name: str) -> bool:
    """True if a management API request may set this engine environment variable."""
    return name in SAFE_ENV_KEYS or name.startswith(SAFE_ENV_PREFIXES)


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    """Values shown only for allow-listed (or sagellm's own), non-secret names; `***`
    otherwise."""
    return {
        k: (v if (env_allowed_remotely(k) or k in SAGELLM_SET_ENV) and not is_secret_name(k)
            else MASK)
        for k, v in env.items()
    }  # fmt: skip


def redact_argv(argv: list[str]) -> list[str]:
    """The command line with the values of secret-looking flags (`--api-key X`) masked."""
    out: list[str] = []
    mask_next = False
    for arg in argv:
        if mask_next:
            out.append(MASK)
            mask_next = False
            continue
        flag, eq, _ = arg.partition("=")
        if flag.startswith("--") and is_secret_name(flag):
            if eq:
                out.append(f"{flag}={MASK}")
            else:
                out.append(arg)
                mask_next = True
            continue
        out.append(arg)
    return out


def engine_environ(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment an engine starts from: ours, without the gateway's credentials."""
    env = dict(os.environ if base is None else base)
    for name in GATEWAY_SECRETS:
        env.pop(name, None)
    return env


# --------------------------------------------------------------------------- admin token


def admin_token_path() -> Path:
    """`$SAGELLM_HOME/admin-token` (mode 0600, in the 0700 state directory)."""
    return paths.state_dir() / "admin-token"


def _read_token_file(path: Path) -> str | None:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(
            f"cannot read the admin token file {path}: {exc}",
            hint=f"fix or remove it, or set {ADMIN_TOKEN_ENV}",
        ) from None
    return token or None


def read_admin_token() -> str | None:
    """The admin token a local client should send: `$SAGELLM_ADMIN_TOKEN`, else the file."""
    return os.environ.get(ADMIN_TOKEN_ENV) or _read_token_file(admin_token_path())


def ensure_admin_token() -> str:
    """The token file's token, creating the file with a random token if it is missing.

    Created with O_EXCL so that two gateways starting at once agree on one token.
    """
    import secrets

    path = admin_token_path()
    existing = _read_token_file(path)
    if existing:
        return existing
    paths.ensure_private_dir(path.parent)
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".admin-token-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
    try:
        os.link(tmp, path)  # atomic: fails if another process created the file first
    except FileExistsError:
        token = _read_token_file(path) or token
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return token
