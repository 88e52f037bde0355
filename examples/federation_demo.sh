#!/usr/bin/env bash
# Two operators on this machine, federated over the libp2p mesh.
#
#   operator-b: a cortex with one neuron (the built-in catalogue: SmolLM2 on CPU)
#   operator-a: a cortex with NO neuron, bootstrapped to operator-b's multiaddr
#
# A chat request sent to operator-a's gateway is served by operator-b's neuron (cold-loaded
# on first use); both operators' ledgers then show the same signed receipt. Everything is
# stopped cleanly at the end (or on Ctrl-C / any failure).
#
#   ./examples/federation_demo.sh ["your question"]
#
# Environment: KEEP=1 keeps the data directories and logs; HELEXA=path/to/helexa.
# Ports: free loopback ports, chosen at start.
set -euo pipefail
cd "$(dirname "$0")/.."

PROMPT=${1:-"What is the capital of France? Answer in one sentence."}
MODEL=smollm2-135m-instruct
HELEXA=${HELEXA:-.venv/bin/helexa}
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$HELEXA" ] || HELEXA=$(command -v helexa)
[ -x "$PYTHON" ] || PYTHON=$(command -v python3)
WORK=$(mktemp -d -t helexa-federation-XXXXXX)
PIDS=()  # started processes, in start order; stopped in reverse

free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

stop_all() {
    local rc=$?
    trap - EXIT INT TERM
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        local pid=${PIDS[i]}
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid"
            # Each drains within its shutdown grace; SIGKILL only if it overstays.
            for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && { echo "pid $pid overstayed: SIGKILL" >&2; kill -KILL "$pid"; }
            local code=0; wait "$pid" 2>/dev/null || code=$?
            echo "stopped pid $pid (exit $code)"
        fi
    done
    if [ "$rc" -ne 0 ]; then
        echo "-- the demo failed (exit $rc); last log lines:" >&2
        tail -n 15 "$WORK"/*.log >&2 || true
    fi
    if [ "${KEEP:-0}" = 1 ]; then echo "data and logs in $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap stop_all EXIT
trap 'exit 130' INT TERM

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND until it succeeds, or fail.
wait_for() {
    local seconds=$1 what=$2; shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then echo "timed out after ${seconds}s waiting for $what" >&2; return 1; fi
        sleep 0.2
    done
}

B_CONTROL=$(free_port); B_GATEWAY=$(free_port); B_MESH=$(free_port)
A_CONTROL=$(free_port); A_GATEWAY=$(free_port); A_MESH=$(free_port)
A_URL=http://127.0.0.1:$A_GATEWAY
B_URL=http://127.0.0.1:$B_GATEWAY

echo "== operator-b: cortex (gateway $B_URL, mesh port $B_MESH)"
"$HELEXA" cortex --data-dir "$WORK/b" --operator operator-b \
    --control-socket "127.0.0.1:$B_CONTROL" --gateway-socket "127.0.0.1:$B_GATEWAY" \
    --mesh-listen "/ip4/127.0.0.1/tcp/$B_MESH" 2>"$WORK/cortex-b.log" &
PIDS+=($!)
wait_for 30 "operator-b's cortex" grep -q "cortex ready" "$WORK/cortex-b.log"

echo "== operator-b: a neuron joins with the operator's join token"
"$HELEXA" neuron --cortex "ws://127.0.0.1:$B_CONTROL" --node-id b-neuron \
    --join-token-file "$WORK/b/join-token" 2>"$WORK/neuron-b.log" &
PIDS+=($!)
# (JSON read as JSON: the gateway writes it compact, with no space after a colon)
has_neuron() { curl -fsS "$1/health" | "$PYTHON" -c 'import json, sys; sys.exit(json.load(sys.stdin)["neurons"] < 1)'; }
wait_for 30 "the neuron to join operator-b" has_neuron "$B_URL"

B_ADDR=$("$HELEXA" mesh id --data-dir "$WORK/b" | sed -n 2p)
echo "   operator-b's mesh address: $B_ADDR"

echo "== operator-a: cortex with no neuron (gateway $A_URL), bootstrapped to operator-b"
"$HELEXA" cortex --data-dir "$WORK/a" --operator operator-a \
    --control-socket "127.0.0.1:$A_CONTROL" --gateway-socket "127.0.0.1:$A_GATEWAY" \
    --mesh-listen "/ip4/127.0.0.1/tcp/$A_MESH" --bootstrap "$B_ADDR" 2>"$WORK/cortex-a.log" &
PIDS+=($!)
wait_for 30 "operator-a's cortex" grep -q "cortex ready" "$WORK/cortex-a.log"
offered() {
    curl -fsS "$A_URL/v1/models" | "$PYTHON" -c 'import json, sys
sys.exit(not any(m.get("federated") for m in json.load(sys.stdin)["data"]))'
}
wait_for 30 "operator-b's announcement to reach operator-a" offered
echo "   operator-a's /v1/models:"
curl -fsS "$A_URL/v1/models" | "$PYTHON" -m json.tool | sed 's/^/     /'

echo "== chat request to operator-a's gateway (served by operator-b's neuron; first use cold-loads it)"
BODY=$("$PYTHON" -c 'import json, sys; print(json.dumps({"model": sys.argv[1], "max_tokens": 48, "temperature": 0,
    "messages": [{"role": "user", "content": sys.argv[2]}]}))' "$MODEL" "$PROMPT")
ANSWER=$(curl -sS --max-time 120 -w '\n%{http_code}' -H 'content-type: application/json' -d "$BODY" \
    "$A_URL/v1/chat/completions")
STATUS=${ANSWER##*$'\n'}
ANSWER=${ANSWER%$'\n'*}
if [ "$STATUS" != 200 ]; then echo "HTTP $STATUS: $ANSWER" >&2; exit 1; fi
echo "$ANSWER" | "$PYTHON" -c 'import json, sys; r = json.load(sys.stdin)
print("   Q:", sys.argv[1]); print("   A:", r["choices"][0]["message"]["content"].strip()); print("   usage:", r["usage"])' "$PROMPT"
REQUEST=$(echo "$ANSWER" | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["id"].removeprefix("chatcmpl-"))')

receipt_in() { "$HELEXA" ledger --data-dir "$1" --json | grep -q "\"request_id\": \"$REQUEST\""; }
wait_for 15 "operator-a's receipt" receipt_in "$WORK/a"
wait_for 15 "operator-b's receipt" receipt_in "$WORK/b"

for side in a b; do
    echo "== operator-$side's ledger (helexa ledger --data-dir .../$side)"
    "$HELEXA" ledger --data-dir "$WORK/$side" | sed 's/^/   /'
done
echo "== the receipt for request $REQUEST, as each side recorded it"
"$PYTHON" - "$REQUEST" <(${HELEXA} ledger --data-dir "$WORK/a" --json) <(${HELEXA} ledger --data-dir "$WORK/b" --json) <<'EOF'
import json, sys
rid = sys.argv[1]
a = next(r for r in json.load(open(sys.argv[2])) if r["request_id"] == rid)
b = next(r for r in json.load(open(sys.argv[3])) if r["request_id"] == rid)
for side, r in (("operator-a", a), ("operator-b", b)):
    print(f"   {side}: {r['direction']:<8} model={r['model']} prompt={r['prompt_tokens']} "
          f"completion={r['completion_tokens']} cost={r['cost']:.6f} flagged={r['flagged']} "
          f"signature={r['signature'][:16]}...")
same = all(a[k] == b[k] for k in ("model", "prompt_tokens", "completion_tokens", "cost", "signature"))
print("   the two ledgers agree" if same and not (a["flagged"] or b["flagged"]) else "   THE LEDGERS DISAGREE")
sys.exit(0 if same else 1)
EOF

echo "== stopping"
