"""The engine flags a management API request may pass (docs/security.md).

An allow-list, not a deny-list: vLLM keeps adding flags that import a class, load a
plugin or read a file (`--worker-cls`, `--scheduler-cls`, `--model-class-overrides`,
`--logging-config`, `--kv-transfer-config`'s `kv_connector_module_path`, `--config
FILE` with `trust-remote-code: true` in it...), so only flags known to do none of that
pass. The CLI and presets, run by the machine's own user, are not restricted.

Flags that EngineSpec sets itself (`--model`, `--host`, `--port`, `--tensor-parallel-size`,
`--served-model-name`, `--max-model-len`, `--gpu-memory-utilization`, ...) are not here
either: a request uses the spec's fields, whose values sagellm checks and reserves for.
"""

from __future__ import annotations

import re

# Flag -> whether it takes a value. Boolean vLLM flags also come as `--no-<flag>`.
API_ENGINE_FLAGS: dict[str, bool] = {
    # vLLM: batching and scheduling
    "--max-num-seqs": True,
    "--max-num-batched-tokens": True,
    "--long-prefill-token-threshold": True,
    "--scheduling-policy": True,  # fcfs | priority
    "--enable-chunked-prefill": False,
    "--async-scheduling": False,
    "--stream-interval": True,
    # vLLM: memory and KV cache
    "--block-size": True,
    "--kv-cache-dtype": True,
    "--enable-prefix-caching": False,
    "--prefix-caching-hash-algo": True,
    "--num-gpu-blocks-override": True,
    "--cpu-offload-gb": True,
    # vLLM: model execution
    "--dtype": True,
    "--seed": True,
    "--quantization": True,
    "--enforce-eager": False,
    "--max-logprobs": True,
    "--disable-sliding-window": False,
    "--disable-cascade-attn": False,
    "--max-cudagraph-capture-size": True,
    "--disable-custom-all-reduce": False,
    "--max-parallel-loading-workers": True,
    "--revision": True,
    "--tokenizer-revision": True,
    # vLLM: the OpenAI server
    "--api-key": True,
    "--uvicorn-log-level": True,
    "--log-level": True,
    "--disable-uvicorn-access-log": False,
    "--disable-log-stats": False,
    "--enable-log-requests": False,
    "--max-log-len": True,
    "--disable-fastapi-docs": False,
    "--enable-request-id-headers": False,
    "--enable-prompt-tokens-details": False,
    "--enable-force-include-usage": False,
    "--enable-server-load-tracking": False,
    "--return-tokens-as-token-ids": False,
    "--response-role": True,
    "--enable-auto-tool-choice": False,
    "--tool-call-parser": True,  # a built-in parser's name (plugins: --tool-parser-plugin)
    "--reasoning-parser": True,
    "--shutdown-timeout": True,
    # sagellm's embedding server (runtime sentence-transformers)
    "--max-batch-size": True,
    "--max-inputs": True,
    "--max-body-bytes": True,
    "--access-log": False,
}

_NUMBER = re.compile(r"^-\d+(\.\d+)?$")


def _canonical(name: str) -> str:
    """vLLM reads `--max_num_seqs` as `--max-num-seqs`."""
    return "--" + name[2:].replace("_", "-")


def _lookup(name: str) -> bool | None:
    """Whether an allowed flag takes a value; None if the flag is not allowed.

    Exact names only: argparse would also take an unambiguous abbreviation, but the
    prefix of an allowed flag may equally be the prefix of a refused one.
    """
    flag = _canonical(name)
    if flag in API_ENGINE_FLAGS:
        return API_ENGINE_FLAGS[flag]
    if flag.startswith("--no-") and API_ENGINE_FLAGS.get("--" + flag[5:]) is False:
        return False
    return None


def refused_api_arg(args: list[str]) -> tuple[str, str] | None:
    """The first argument a management request may not pass, and why; None if all may."""
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if not arg.startswith("--") or arg == "--":
            return arg, "is not a flag of the allow-list"
        name, eq, _ = arg.partition("=")
        takes_value = _lookup(name)
        if takes_value is None:
            return arg, f"{name} is not on the allow-list of engine flags for the API"
        if takes_value and not eq:
            value = args[index] if index < len(args) else None
            if value is None or (value.startswith("-") and not _NUMBER.match(value)):
                return arg, f"{name} needs a value"
            index += 1
        elif not takes_value and eq:
            return arg, f"{name} takes no value"
    return None
