#!/usr/bin/env bash
# A complete local deployment: a cortex and a neuron on this machine. Waits until the neuron
# has joined, sends a chat request for the default model (cold-loading it), prints the
# streamed answer, and stops both cleanly.
#
#   ./examples/two_node_demo.sh ["your question"]
#
# Environment: CONTROL_PORT (default 7070), GATEWAY_PORT (8080), KEEP=1 keeps the data dir.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh >/dev/null

PROMPT=${1:-"What is the capital of France? Answer in one sentence."}
CONTROL_PORT=${CONTROL_PORT:-7070}
GATEWAY_PORT=${GATEWAY_PORT:-8080}
WORK=$(mktemp -d -t helexa-demo-XXXXXX)
HELEXA=.venv/bin/helexa
GATEWAY=http://127.0.0.1:$GATEWAY_PORT
CORTEX_PID=""
NEURON_PID=""

stop() {
    # SIGTERM: the neuron drains and unloads, the cortex drains; both exit 0.
    local rc=0
    if [ -n "$NEURON_PID" ] && kill -0 "$NEURON_PID" 2>/dev/null; then
        kill -TERM "$NEURON_PID"; wait "$NEURON_PID" || rc=$?
        echo "neuron stopped (exit $rc)"
    fi
    if [ -n "$CORTEX_PID" ] && kill -0 "$CORTEX_PID" 2>/dev/null; then
        kill -TERM "$CORTEX_PID"; wait "$CORTEX_PID" || rc=$?
        echo "cortex stopped (exit $rc)"
    fi
    [ "${KEEP:-0}" = 1 ] && echo "logs and data in $WORK" || rm -rf "$WORK"
}
trap stop EXIT

echo "== starting a cortex (control ws://127.0.0.1:$CONTROL_PORT, gateway $GATEWAY)"
$HELEXA cortex --data-dir "$WORK/cortex" --control-socket "127.0.0.1:$CONTROL_PORT" \
    --gateway-socket "127.0.0.1:$GATEWAY_PORT" 2>"$WORK/cortex.log" &
CORTEX_PID=$!
for _ in $(seq 100); do [ -s "$WORK/cortex/join-token" ] && break; sleep 0.1; done

echo "== starting a neuron with the operator's join token"
$HELEXA neuron --cortex "ws://127.0.0.1:$CONTROL_PORT" --node-id demo-neuron \
    --join-token-file "$WORK/cortex/join-token" 2>"$WORK/neuron.log" &
NEURON_PID=$!

echo "== waiting for the neuron to join"
joined=""
for _ in $(seq 150); do
    if $HELEXA status --cortex "$GATEWAY" --data-dir "$WORK/cortex" --json 2>/dev/null | grep -q '"node_id": "demo-neuron"'; then
        joined=1; break
    fi
    sleep 0.2
done
if [ -z "$joined" ]; then
    echo "the neuron did not join; last log lines:" >&2
    tail -n 20 "$WORK/cortex.log" "$WORK/neuron.log" >&2
    exit 1
fi
$HELEXA status --cortex "$GATEWAY" --data-dir "$WORK/cortex"

echo
echo "== asking smollm2-135m-instruct (the first request cold-loads it): $PROMPT"
$HELEXA chat --gateway "$GATEWAY" "$PROMPT"
echo
$HELEXA status --cortex "$GATEWAY" --data-dir "$WORK/cortex"
echo
