#!/usr/bin/env bash
# Gateway I/O ceiling against its peers (issue 7, bench item 1): the same JSON ping -> pong
# load against gateway-uring and servers doing the same work (HS256 JWT at the upgrade, JSON
# parse of every text frame, a JSON pong): tokio + tokio-tungstenite, tokio + fastwebsockets,
# Node `ws`, uWebSockets.js. The server is pinned to core SERVER_CPU and the load client
# (bench/src/bin/ws_ping_load.rs) to CLIENT_CPU, so each is compared on one server core;
# gateway-2core runs the gateway unpinned with 2 shards (sharing a core with the client).
#
# Per round, servers alternate: (a) closed loop, IN_FLIGHT pings outstanding per connection:
# pongs/s at saturation, server CPU per pong (from /proc/<pid>/stat), client CPU (to show
# whether the client was the limit); then (b) open loop at RATE_SHARE (0.5) of that server's
# median saturation: p50/p99 from the intended send time. Medians of RUNS rounds.
#
# Usage: bench/run-peers.sh            (under flock /work/bench.lock)
# Env:   RUNS (3), CONNECTIONS (1000), IN_FLIGHT (8), WARMUP_SECONDS (3), MEASURE_SECONDS (10),
#        RATE_SHARE (0.5), SERVERS ("gateway gateway-epoll tungstenite fastwebsockets node-ws
#        uws gateway-2core"), SERVER_CPU (0), CLIENT_CPU (1), BUILD (1), CARGO_TARGET_DIR,
#        NODE_CACHE (~/.cache/chatify/bench-node)
# Needs Redis (REDIS_URL in .local/chatify.env): the gateway checks the token deny-list.
set -euo pipefail
# shellcheck source=bench/lib-peers.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib-peers.sh"
cd "$ROOT"

RUNS=${RUNS:-3}
CONNECTIONS=${CONNECTIONS:-1000}
IN_FLIGHT=${IN_FLIGHT:-8}
WARMUP_SECONDS=${WARMUP_SECONDS:-3}
MEASURE_SECONDS=${MEASURE_SECONDS:-10}
RATE_SHARE=${RATE_SHARE:-0.5}
read -r -a SERVERS <<<"${SERVERS:-gateway gateway-epoll tungstenite fastwebsockets node-ws uws gateway-2core}"
PORT=18300
RESULTS=$TARGET_DIR/bench-results/peers-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$RESULTS"
ulimit -n 20000 2>/dev/null || true

build_binaries
install_node_peers | tee "$RESULTS/versions.txt"
stat -c "%y %s %n" "$BIN"/{gateway-uring,ws_ping_baseline,ws_ping_fastwebsockets,ws_ping_load} >>"$RESULTS/versions.txt"
git rev-parse HEAD >>"$RESULTS/versions.txt" 2>/dev/null || true
machine_line | tee "$RESULTS/machine.txt"

SERVER_PID=
trap 'stop_pid "$SERVER_PID"' EXIT

# one_load SERVER KIND(sat|rate) RUN [RATE]
one_load() {
    local server=$1 kind=$2 run=$3 rate=${4:-0}
    local out=$RESULTS/$server-$kind-$run
    start_server "$server" "$PORT" "$out.server.log"
    sleep 0.3
    local cpu_before cpu_after load_before
    load_before=$(cut -d' ' -f1-3 /proc/loadavg)
    cpu_before=$(cpu_seconds "$SERVER_PID")
    local rate_args=()
    [[ $kind == rate ]] && rate_args=(--rate "$rate")
    printf '%-15s %-4s run %s [loadavg %s] ' "$server" "$kind" "$run" "$load_before"
    taskset -c "$CLIENT_CPU" "$BIN/ws_ping_load" --target "ws://127.0.0.1:$PORT/ws" --label "$server" \
        --connections "$CONNECTIONS" --in-flight "$IN_FLIGHT" "${rate_args[@]}" \
        --warmup-seconds "$WARMUP_SECONDS" --seconds "$MEASURE_SECONDS" \
        --json-out "$out.json" | sed 's/^[^:]*: //'
    cpu_after=$(cpu_seconds "$SERVER_PID")
    echo "{\"server_cpu_seconds\": $(awk -v a="$cpu_after" -v b="$cpu_before" 'BEGIN{printf "%.3f", a-b}'), \"loadavg\": \"$load_before\"}" >"$out.server.json"
    stop_pid "$SERVER_PID"
    SERVER_PID=
    sleep 1 # let TIME_WAIT and the kernel settle between servers
}

echo "load: $CONNECTIONS connections; saturation: $IN_FLIGHT pings in flight each; ${WARMUP_SECONDS}s warm-up, ${MEASURE_SECONDS}s measured; $RUNS rounds; server on CPU $SERVER_CPU, client on CPU $CLIENT_CPU"
for run in $(seq "$RUNS"); do
    for server in "${SERVERS[@]}"; do
        one_load "$server" sat "$run"
    done
done
# Open loop at RATE_SHARE of each server's median saturation rate.
for run in $(seq "$RUNS"); do
    for server in "${SERVERS[@]}"; do
        rate=$(python3 - "$RESULTS" "$server" "$RUNS" "$RATE_SHARE" <<'EOF'
import json, statistics, sys
results, server, runs, share = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
print(round(share * statistics.median(
    json.load(open(f"{results}/{server}-sat-{i}.json"))["pongs_per_second"] for i in range(1, runs + 1))))
EOF
)
        one_load "$server" rate "$run" "$rate"
    done
done

python3 "$ROOT/bench/peers_table.py" "$RESULTS" "$RUNS" "${SERVERS[@]}" | tee "$RESULTS/results.md"
echo "raw results: $RESULTS"
