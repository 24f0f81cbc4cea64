#!/usr/bin/env bash
# The main job on a fresh machine, fully offline: a real small text model (Gemma 3 270M base,
# shipped on PyPI as a GGUF and converted once into the model cache) and all-MiniLM-L6-v2
# embeddings, served as two engines; one completion and one embedding request; then stop.
#
#   bash scripts/demo.sh                 # state in $SAGELLM_HOME (default ~/.local/state/sagellm)
#   KEEP=1 bash scripts/demo.sh          # leave the engines running afterwards
#
# First run: ~2-5 min to convert the model (3.5 GB RAM peak), ~1-4 min for Gemma to load.
# Needs: bash scripts/install.sh, plus the demo extra (pip install -e '.[demo]').
set -euo pipefail
cd "$(dirname "$0")/.."

SAGE=(python -m sagellm_cli)   # no reliance on the console script being on PATH
TEXT_MODEL=gemma-3-270m
EMBED_MODEL=all-MiniLM-L6-v2
TIMEOUT=${TIMEOUT:-900}        # seconds to wait for both engines
engine_ids=()

log() { printf '\033[1m[demo]\033[0m %s\n' "$*" >&2; }

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ "${KEEP:-0}" = "1" ] && [ "$rc" = "0" ]; then
        log "KEEP=1: engines left running: ${engine_ids[*]:-none} (stop: sage llm engine stop ID)"
        exit 0
    fi
    for id in "${engine_ids[@]:+${engine_ids[@]}}"; do
        log "stopping engine $id"
        "${SAGE[@]}" llm engine stop "$id" >/dev/null 2>&1 || log "could not stop $id"
    done
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

json_field() {  # json_field FIELD  <json on stdin
    python -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"
}

# 1. The model: a no-op once it's in the cache.
log "preparing $TEXT_MODEL (a no-op when already cached)"
"${SAGE[@]}" llm model prepare-demo

# 2. Both engines start concurrently; ids are recorded at once so cleanup can stop them.
start_engine() {  # start_engine ARGS...  -> prints the engine id
    local out
    out=$("${SAGE[@]}" llm engine start "$@" --no-wait --json)
    printf '%s' "$out" | json_field id
}
log "starting $TEXT_MODEL (vLLM) and $EMBED_MODEL (embeddings)"
gemma_id=$(start_engine "$TEXT_MODEL" --served-model-name "$TEXT_MODEL" \
    --max-model-len 1024 --kv-cache-gb 0.25)
engine_ids+=("$gemma_id")
embed_id=$(start_engine "$EMBED_MODEL" --engine-kind embedding --served-model-name "$EMBED_MODEL")
engine_ids+=("$embed_id")

wait_ready() {  # wait_ready ID  -> prints the engine's base URL once ready
    local id=$1 started=$SECONDS record status
    while true; do
        record=$("${SAGE[@]}" llm engine show "$id" --json)
        status=$(printf '%s' "$record" | json_field status)
        case "$status" in
            ready) printf '%s' "$record" | json_field url; return 0 ;;
            failed|stopped|stopping)
                log "engine $id $status; last log lines:"
                "${SAGE[@]}" llm engine logs "$id" -n 20 >&2 || true
                return 1 ;;
        esac
        if (( SECONDS - started > TIMEOUT )); then
            log "engine $id not ready after ${TIMEOUT}s"
            return 1
        fi
        sleep 2
    done
}
t0=$SECONDS
gemma_url=$(wait_ready "$gemma_id")
embed_url=$(wait_ready "$embed_id")
log "both engines ready after $((SECONDS - t0))s: $gemma_url, $embed_url"

# 3. One request each.
prompt="The capital of France is"
log "POST $gemma_url/v1/completions  prompt: \"$prompt\""
completion=$(curl -sS --fail-with-body --max-time 300 "$gemma_url/v1/completions" \
    -H 'Content-Type: application/json' \
    -d "{\"model\": \"$TEXT_MODEL\", \"prompt\": \"$prompt\", \"max_tokens\": 24, \"temperature\": 0}")
printf '%s' "$completion" | python -c '
import json, sys
r = json.load(sys.stdin)
print("completion:", repr(r["choices"][0]["text"]))
print("usage:     ", r["usage"])'

log "POST $embed_url/v1/embeddings"
embedding=$(curl -sS --fail-with-body --max-time 120 "$embed_url/v1/embeddings" \
    -H 'Content-Type: application/json' \
    -d "{\"model\": \"$EMBED_MODEL\", \"input\": [\"Paris is the capital of France.\", \"The French capital is Paris.\"]}")
printf '%s' "$embedding" | python -c '
import json, math, sys
r = json.load(sys.stdin)
n = len(r["data"])
a, b = (d["embedding"] for d in r["data"])
cos = sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
print(f"embeddings: {n} x {len(a)} dims, first values {[round(x, 4) for x in a[:4]]}")
print(f"cosine(paraphrases): {cos:.3f}")'

log "done"
