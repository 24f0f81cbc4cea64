#!/usr/bin/env bash
# Run the real-GPU test module (tests/test_gpu_device.py) on the lent GPU machine.
#
# The machine has torch, sentence-transformers, transformers, nvidia-ml-py, rich,
# psutil, httpx, anyio, h11 and click, but none of: pydantic (+ core, annotated-types,
# typing-inspection), starlette, uvicorn, or the typer version we use. Those travel as
# wheels in the git-ignored .whl/ folder (see docs/gpu.md); name `.whl` in the
# device call's `carry`. The embedding model is built on the machine (tiny BERT).
#
#   bash scripts/gpu_device_run.sh            # writes $OUT/gpu_device.log, env.txt, gpu.json
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-device-out}"
mkdir -p "$OUT"

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { echo "wheel install failed" | tee "$OUT/env.txt"; exit 1; }
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# conftest disables NVML for the CPU suite unless told otherwise.
export SAGELLM_DISABLE_NVML=0
unset SAGELLM_MOCK_GPUS SAGELLM_MOCK_NVLINK

{
    echo "== $(date -u +%FT%TZ) $(uname -r)"
    nvidia-smi -L
    nvidia-smi --query-gpu=index,name,uuid,memory.total,memory.used,driver_version --format=csv
    python3 -c 'import sys, torch, pynvml, typer, pydantic, starlette, uvicorn, sentence_transformers as st;
print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "st", st.__version__, "typer", typer.__version__, "pydantic", pydantic.__version__)'
} 2>&1 | tee "$OUT/env.txt"

python3 -m pytest tests/test_gpu_device.py -m gpu -v -s -p no:cacheprovider -o addopts="-ra" \
    2>&1 | tee "$OUT/gpu_device.log"
rc=${PIPESTATUS[0]}

python3 -m sagellm_cli llm gpu --json >"$OUT/gpu.json" 2>>"$OUT/gpu_device.log"
# Nothing may be left on the GPU by the tests.
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv 2>&1 | tee -a "$OUT/gpu_device.log"
exit "$rc"
