#!/usr/bin/env bash
# The main job, fully offline: the `local-demo` preset (Gemma 3 270M base, shipped on PyPI as
# a GGUF and converted once into the model cache, plus all-MiniLM-L6-v2 embeddings) behind the
# gateway; one completion and one embedding request through the gateway; then everything stops.
#
#   bash scripts/demo.sh            # state in $SAGELLM_HOME (default ~/.local/state/sagellm)
#   KEEP=1 bash scripts/demo.sh     # leave the engines and the gateway running
#   PORT=9000 bash scripts/demo.sh  # gateway port (default 8889)
#
# First run: ~2-5 min to convert the model (3.5 GB RAM peak), ~1-4 min for Gemma to load.
set -euo pipefail
cd "$(dirname "$0")/.."

SAGE=(python -m sagellm_cli)   # no reliance on the console script being on PATH
PORT=${PORT:-8889}
GATEWAY="http://127.0.0.1:$PORT"
started=0

log() { printf '\033[1m[demo]\033[0m %s\n' "$*" >&2; }

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ "$started" = "1" ]; then
        if [ "${KEEP:-0}" = "1" ] && [ "$rc" = "0" ]; then
            log "KEEP=1: left running (stop: sage llm serve --stop; sage llm preset down local-demo)"
            exit 0
        fi
        log "stopping the gateway and the local-demo engines"
        "${SAGE[@]}" llm serve --stop >/dev/null 2>&1 || log "could not stop the gateway"
        "${SAGE[@]}" llm preset down local-demo >/dev/null 2>&1 || log "could not stop the preset"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "1/4 preparing the demo model (a no-op when already cached)"
"${SAGE[@]}" llm model prepare-demo

log "2/4 sage llm preset apply -n local-demo (engines start concurrently)"
started=1
"${SAGE[@]}" llm preset apply -n local-demo --timeout 900

log "3/4 sage llm serve --background --port $PORT"
"${SAGE[@]}" llm serve --background --port "$PORT"

log "4/4 requests through the gateway at $GATEWAY/v1"
curl -sS --fail-with-body "$GATEWAY/v1/models" | python -c '
import json, sys
print("models:", ", ".join(m["id"] for m in json.load(sys.stdin)["data"]))'

prompt="The capital of France is"
curl -sS --fail-with-body --max-time 300 "$GATEWAY/v1/completions" \
    -H 'Content-Type: application/json' \
    -d "{\"model\": \"demo-text\", \"prompt\": \"$prompt\", \"max_tokens\": 24, \"temperature\": 0}" |
python -c '
import json, sys
r = json.load(sys.stdin)
print("completion:", repr(sys.argv[1] + r["choices"][0]["text"]))
print("usage:     ", r["usage"])' "$prompt"

curl -sS --fail-with-body --max-time 120 "$GATEWAY/v1/embeddings" \
    -H 'Content-Type: application/json' \
    -d '{"model": "demo-embed", "input": ["Paris is the capital of France.", "The French capital is Paris."]}' |
python -c '
import json, math, sys
r = json.load(sys.stdin)
a, b = (d["embedding"] for d in r["data"])
cos = sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
n = len(r["data"])
print(f"embeddings: {n} x {len(a)} dims, cosine(paraphrases) = {cos:.3f}")'

log "done"
