"""Byte and count limits on everything that enters sagellm (docs/security.md#limits).

One place for every limit, so that presets, `engine start` and the management API refuse
the same sizes with the same message. Each is far above any real use and far below what
would hurt: a limit hit is exit 2 / HTTP 400 naming it, and nothing is recorded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sagellm_cli.core.errors import BadInput

KIB = 1024
MIB = 1024 * KIB

# Preset files: the file itself, and the bytes of its scalars once YAML aliases are
# expanded (a 1 MiB string referenced 99 times would otherwise be 99 MiB in memory and
# more in output).
MAX_PRESET_FILE_BYTES = 1 * MIB
MAX_PRESET_EXPANDED_BYTES = 4 * MIB

# Engine spec fields (EngineSpec's annotations, so presets, the CLI and the API alike).
# Lengths are in characters, as pydantic counts them.
MAX_MODEL_CHARS = 4096  # PATH_MAX
MAX_LABEL_CHARS = 128
MAX_NAME_CHARS = 256  # served_model_name, host, cluster, env names, a registration URL
MAX_EXTRA_ARGS = 256
MAX_ARG_CHARS = 4 * KIB
MAX_ENV_VARS = 256
MAX_ENV_VALUE_CHARS = 32 * KIB
MAX_LIST_ITEMS = 256  # gpus

# argv plus environment handed to one process. Linux refuses more than ARG_MAX (usually
# 2 MiB, a quarter of the stack limit) with E2BIG, and any single string over 128 KiB.
MAX_EXEC_BYTES = 512 * KIB


def exec_bytes(argv: Sequence[str], env: Mapping[str, str]) -> int:
    """What execve counts: each argument and each `NAME=value`, NUL-terminated."""
    size = sum(len(arg.encode("utf-8", "surrogateescape")) + 1 for arg in argv)
    return size + sum(
        len(f"{k}={v}".encode("utf-8", "surrogateescape")) + 1 for k, v in env.items()
    )


def check_exec_size(argv: Sequence[str], env: Mapping[str, str]) -> None:
    """Refuse (exit 2 / HTTP 400) a command line plus environment over MAX_EXEC_BYTES."""
    size = exec_bytes(argv, env)
    if size > MAX_EXEC_BYTES:
        raise BadInput(
            f"the engine's command line and environment are {size} bytes, over the "
            f"limit of {MAX_EXEC_BYTES} bytes",
            hint="shorten extra_args and env values",
        )


def check_length(what: str, value: str | None, limit: int) -> None:
    """Refuse a string field longer than `limit` characters, naming the field and limit."""
    if value is not None and len(value) > limit:
        raise BadInput(f"{what} is {len(value)} characters, over the limit of {limit}")
