"""Which dtype a vLLM engine on the CPU gets: one the host really computes in.

vLLM's CPU build (`dtype: auto`) turns a float32 checkpoint into bfloat16 on every x86
host and, where the CPU advertises AMX, runs bf16 attention through its AMX kernel
(`cpu_attention_with_kv_cache`, ISA "amx"). Two ways that goes wrong, both seen on
users' hosts:

- the CPU reports AMX in CPUID but the kernel does not grant the AMX tile state
  (virtual machines that mask XTILEDATA): the first AMX instruction is SIGILL, after
  `/health` has already answered;
- tiny float32 checkpoints downcast to bf16 died in that kernel on their first generation
  on an AMX host, while `--dtype float32` (the `vec` kernel) answered.

Without native bf16 (AVX2 only) vLLM emulates bf16 matmuls, which is slower than float32.
So: keep float32 checkpoints in float32, and use float32 where bf16 is not native or AMX
is not usable; leave vLLM's choice only for 16-bit checkpoints on hosts with working
native bf16. A `--dtype` the user passes always wins.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

FLOAT32 = "float32"
# arch_prctl(2) codes and the AMX tile-data state component (Linux >= 5.16).
_SYS_ARCH_PRCTL = 158
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


@dataclass(frozen=True)
class DtypeChoice:
    """`--dtype` for a CPU engine (None: leave vLLM's choice) and why, for the progress line."""

    dtype: str | None
    reason: str | None = None

    def argv(self) -> list[str]:
        """The flags to add."""
        return ["--dtype", self.dtype] if self.dtype else []


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The first CPU's flags from /proc/cpuinfo (empty where unreadable)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def amx_granted() -> bool:
    """True if the kernel lets this process use AMX tiles (what vLLM's kernel needs).

    The permission is per process and inherited by children, so asking for it here
    changes nothing for the engine; a refusal means AMX code would die with SIGILL.
    """
    if os.uname().machine != "x86_64":  # the syscall number is x86-64's
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        result = libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA)
    except (OSError, AttributeError):
        return False
    return result == 0


def checkpoint_dtype(model_dir: str) -> str | None:
    """`torch_dtype` (or `dtype`) from a local model folder's config.json, if readable."""
    try:
        data = json.loads((Path(model_dir).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return None
    text = data.get("text_config") if isinstance(data.get("text_config"), dict) else {}
    value = data.get("torch_dtype") or data.get("dtype") or text.get("torch_dtype")
    return value if isinstance(value, str) else None


def _user_dtype(extra_args: list[str]) -> bool:
    return any(arg == "--dtype" or arg.startswith("--dtype=") for arg in extra_args)


def choose(
    model_dir: str,
    extra_args: list[str],
    *,
    flags: frozenset[str] | None = None,
    amx_ok: bool | None = None,
) -> DtypeChoice:
    """The dtype for a vLLM engine on this CPU (the rules are in the module docstring);
    `flags` and `amx_ok` stand in for this host's, to check the rules for another."""
    if _user_dtype(extra_args):
        return DtypeChoice(None)
    if checkpoint_dtype(model_dir) == FLOAT32:
        return DtypeChoice(FLOAT32, "float32 checkpoint kept in float32 (vLLM would use bf16)")
    if os.uname().machine != "x86_64":
        return DtypeChoice(None)
    flags = cpu_flags() if flags is None else flags
    if "amx_tile" in flags:
        if not (amx_granted() if amx_ok is None else amx_ok):
            return DtypeChoice(
                FLOAT32, "float32: this CPU reports AMX but the kernel refuses AMX state"
            )
        return DtypeChoice(None)
    if "avx512_bf16" in flags:
        return DtypeChoice(None)
    return DtypeChoice(FLOAT32, "float32: this CPU has no native bf16 (vLLM would emulate it)")
