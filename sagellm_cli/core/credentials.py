"""Credentials: the gateway's admin token file, and keeping secrets out of engines and output.

The admin token guards everything that can start a process (the management API). It is
created once, at random, in the private state directory, so that local tools read it
from there and nothing on the machine reaches the control surface without it.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
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
# --allow-remote-engine-config), and whose values output shows: exact names only.
# Everything else can run code or redirect what is loaded: LD_*, PYTHON*, BROWSER,
# VLLM_PLUGINS, logging config paths, CUDA_INJECTION64_PATH (a library CUDA loads),
# NCCL_NET_PLUGIN / NCCL_TUNER_PLUGIN, OMP_TOOL_LIBRARIES, HF_ENDPOINT (where weights and
# tokenizers come from), HF_HOME (which cache they are read from), ...
SAFE_ENV_KEYS = frozenset(
    {
        # Hugging Face: credentials and download behaviour, never where files come from.
        "HF_TOKEN",
        "HF_HUB_OFFLINE",
        "HF_HUB_DISABLE_TELEMETRY",
        "HF_HUB_DISABLE_PROGRESS_BARS",
        "HF_HUB_ENABLE_HF_TRANSFER",
        "HF_HUB_DOWNLOAD_TIMEOUT",
        "HF_HUB_ETAG_TIMEOUT",
        "TRANSFORMERS_OFFLINE",
        "TOKENIZERS_PARALLELISM",
        # CUDA and PyTorch device selection and allocation.
        "CUDA_VISIBLE_DEVICES",
        "CUDA_DEVICE_ORDER",
        "CUDA_LAUNCH_BLOCKING",
        "CUDA_DEVICE_MAX_CONNECTIONS",
        "CUDA_MODULE_LOADING",
        "PYTORCH_CUDA_ALLOC_CONF",
        # NCCL tuning (no *_PLUGIN, *_FILE or topology file names).
        "NCCL_DEBUG",
        "NCCL_DEBUG_SUBSYS",
        "NCCL_P2P_DISABLE",
        "NCCL_SHM_DISABLE",
        "NCCL_IB_DISABLE",
        "NCCL_SOCKET_IFNAME",
        "NCCL_CUMEM_ENABLE",
        "NCCL_NVLS_ENABLE",
        "NCCL_ALGO",
        "NCCL_PROTO",
        "NCCL_MIN_NCHANNELS",
        "NCCL_MAX_NCHANNELS",
        "NCCL_BUFFSIZE",
        # Threads (no OMP_TOOL*, which loads a library).
        "OMP_NUM_THREADS",
        "OMP_PROC_BIND",
        "OMP_PLACES",
        "OMP_SCHEDULE",
        "OMP_DYNAMIC",
        "OMP_WAIT_POLICY",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
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
SAGELLM_SET_ENV = frozenset({
    "TMPDIR", "VLLM_CACHE_ROOT", "PYTHONUNBUFFERED", "SAGELLM_ENGINE_ID",
    "VLLM_NIXL_SIDE_CHANNEL_PORT", "VLLM_NIXL_SIDE_CHANNEL_HOST",  # core/launchers/runtimes.py (P/D)
})  # fmt: skip
_SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.I)


def is_secret_name(name: str) -> bool:
    """True for names that look like they hold a secret (`HF_TOKEN`, `--api-key`)."""
    return bool(_SECRET_NAME.search(name))


def env_allowed_remotely(name: str) -> bool:
    """True if a management API request may set this engine environment variable."""
    return name in SAFE_ENV_KEYS


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
    """The file's token; refused (exit 2) unless it is a regular file of this user that
    nobody else can read or write, in a state dir nobody else can write (trust on first
    use, checked every use: a token someone else planted is never used)."""
    paths.trusted_dir(path.parent)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BadInput(
            f"cannot read the admin token file {path}: {exc.strerror}",
            hint=f"remove it (a new one is made by `sage llm serve`), or set {ADMIN_TOKEN_ENV}",
        ) from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise BadInput(f"the admin token file {path} is not a regular file",
                           hint="remove it (a new one is made by `sage llm serve`)")  # fmt: skip
        paths.check_owned(path, info, private=True)
        raw = fh.read(4096)
    try:
        token = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadInput(
            f"the admin token file {path} is not UTF-8 text",
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
