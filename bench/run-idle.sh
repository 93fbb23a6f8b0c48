#!/usr/bin/env bash
# Memory per idle authenticated WebSocket connection (issue 7, bench item 2).
#
# single: for each server (gateway-uring with 1 shard and each peer, alternating, RUNS
#   rounds) open IDLE_CONNECTIONS (19,000: a process may hold at most 20,000 open files here)
#   authenticated connections with bench/src/bin/ws_ping_load.rs --mode idle (one JSON ping
#   per HEARTBEAT_SECONDS per connection), wait SETTLE_SECONDS (longer than one heartbeat,
#   so every connection has been used once), then read the server's VmRSS: (RSS after - RSS
#   before connecting) / established connections (counted with ss). Also the box's Slab
#   growth per connection (kernel socket structures of both ends: client and server).
# scale: GATEWAYS gateway-uring processes (own CHATIFY_NODE_ID and ports, 1 shard each,
#   unpinned) each held at PER_GATEWAY connections by its own load process on its own 127.x
#   source addresses: 100k+ connections on the box, the load processes ramping one after
#   another (each connection heartbeats from the moment it opens). One round.
#
# Usage: bench/run-idle.sh [single|scale|both]     (under flock /work/bench.lock)
# Env:   TABLE_ONLY (a results dir: only remake its single table), RUNS (3), IDLE_CONNECTIONS (19000), HEARTBEAT_SECONDS (10), SETTLE_SECONDS (15),
#        SERVERS ("gateway tungstenite fastwebsockets node-ws uws"; also gateway-epoll, and
#        gateway-before / gateway-epoll-before with GATEWAY_BEFORE_BIN), GATEWAYS (6),
#        PER_GATEWAY (18000), SCALE_SERVER (gateway; gateway-before runs GATEWAY_BEFORE_BIN),
#        SERVER_CPU (0), CLIENT_CPU (1), BUILD (1), CARGO_TARGET_DIR
# Needs Redis (REDIS_URL in .local/chatify.env): the gateway checks the token deny-list.
set -euo pipefail
# shellcheck source=bench/lib-peers.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib-peers.sh"
cd "$ROOT"

WHAT=${1:-both}
RUNS=${RUNS:-3}
IDLE_CONNECTIONS=${IDLE_CONNECTIONS:-19000}
HEARTBEAT_SECONDS=${HEARTBEAT_SECONDS:-10}
SETTLE_SECONDS=${SETTLE_SECONDS:-15}
GATEWAYS=${GATEWAYS:-6}
PER_GATEWAY=${PER_GATEWAY:-18000}
SCALE_SERVER=${SCALE_SERVER:-gateway}
read -r -a SERVERS <<<"${SERVERS:-gateway tungstenite fastwebsockets node-ws uws}"
RESULTS=$TARGET_DIR/bench-results/idle-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$RESULTS"
ulimit -n 20000 2>/dev/null || true

build_binaries
install_node_peers | tee "$RESULTS/versions.txt"
git rev-parse HEAD >>"$RESULTS/versions.txt" 2>/dev/null || true
machine_line | tee "$RESULTS/machine.txt"
{
    echo "ulimit -n (soft/hard): $(ulimit -Sn) / $(ulimit -Hn)"
    for key in net.ipv4.ip_local_port_range net.core.somaxconn net.ipv4.tcp_max_syn_backlog \
        fs.file-max fs.nr_open net.ipv4.tcp_mem net.ipv4.tcp_rmem net.ipv4.tcp_wmem; do
        echo "$key = $(sysctl -n "$key" 2>/dev/null | tr '\t' ' ')"
    done
} | tee "$RESULTS/limits.txt"

PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do stop_pid "$pid"; done; }
trap cleanup EXIT

slab_kib() { awk '/^Slab:/ { print $2 }' /proc/meminfo; }
established() { ss -Htn state established "( sport = :$1 )" | wc -l; }

wait_ready() { # file... (300 s at most)
    for _ in $(seq 3000); do
        local all=1
        for f in "$@"; do [[ -s $f ]] || all=0; done
        [[ $all == 1 ]] && return 0
        sleep 0.1
    done
    echo "load processes not ready in 300 s" >&2
    return 1
}

# single_round SERVER RUN
single_round() {
    local server=$1 run=$2 port=18500
    local out=$RESULTS/$server-$run
    start_server "$server" "$port" "$out.server.log"
    local server_pid=$SERVER_PID
    PIDS=("$server_pid")
    sleep 2
    local rss0 slab0 load
    rss0=$(rss_kib "$server_pid")
    slab0=$(slab_kib)
    load=$(cut -d' ' -f1-3 /proc/loadavg)
    rm -f "$out.ready"
    taskset -c "$CLIENT_CPU" "$BIN/ws_ping_load" --mode idle --target "ws://127.0.0.1:$port/ws" \
        --label "$server" --connections "$IDLE_CONNECTIONS" --heartbeat-seconds "$HEARTBEAT_SECONDS" \
        --connect-concurrency 200 --source-ips 4 --source-ip-first 127.0.1.1 \
        --ready-file "$out.ready" --json-out "$out.json" >"$out.load.log" 2>&1 &
    local load_pid=$!
    PIDS+=("$load_pid")
    wait_ready "$out.ready"
    sleep "$SETTLE_SECONDS"
    local rss1 slab1 conns
    rss1=$(rss_kib "$server_pid")
    slab1=$(slab_kib)
    conns=$(established "$port")
    stop_pid "$load_pid"
    stop_pid "$server_pid"
    PIDS=()
    python3 - "$out" "$server" "$rss0" "$rss1" "$slab0" "$slab1" "$conns" "$load" <<'EOF'
import json, sys
out, server, rss0, rss1, slab0, slab1, conns, load = sys.argv[1:]
rss0, rss1, slab0, slab1, conns = map(int, (rss0, rss1, slab0, slab1, conns))
client = json.load(open(f"{out}.json"))
row = {"server": server, "rss_before_kib": rss0, "rss_after_kib": rss1, "established": conns,
       "bytes_per_connection": (rss1 - rss0) * 1024 / max(conns, 1),
       "slab_bytes_per_connection": (slab1 - slab0) * 1024 / max(conns, 1),
       "loadavg": load, "client": client}
json.dump(row, open(f"{out}.row.json", "w"), indent=2)
print(f"{server:<15} {conns} established, RSS {rss0} -> {rss1} KiB: "
      f"{row['bytes_per_connection']:,.0f} B/conn; slab {row['slab_bytes_per_connection']:,.0f} B/conn "
      f"(both ends); connect {client['connect_ms']:.0f} ms; heartbeat pongs {client['pongs_total']}; "
      f"errors {client['errors']} [loadavg {load}]")
EOF
    sleep 2
}

scale_round() {
    local out=$RESULTS/scale
    local ports=() server_pids=() load_pids=() rss0=() ready=()
    local slab0 load
    load=$(cut -d' ' -f1-3 /proc/loadavg)
    for k in $(seq 0 $((GATEWAYS - 1))); do
        local port=$((18600 + 10 * k))
        SERVER_CPU=0-1 start_server "$SCALE_SERVER" "$port" "$out-gw$k.server.log" "gw-idle-$k"
        ports+=("$port")
        server_pids+=("$SERVER_PID")
        PIDS+=("$SERVER_PID")
    done
    sleep 2
    for pid in "${server_pids[@]}"; do rss0+=("$(rss_kib "$pid")"); done
    slab0=$(slab_kib)
    for k in $(seq 0 $((GATEWAYS - 1))); do
        rm -f "$out-load$k.ready"
        ready+=("$out-load$k.ready")
        "$BIN/ws_ping_load" --mode idle --target "ws://127.0.0.1:${ports[$k]}/ws" --label "gw-idle-$k" \
            --connections "$PER_GATEWAY" --heartbeat-seconds "$HEARTBEAT_SECONDS" \
            --connect-concurrency 200 --source-ips 4 --source-ip-first "127.0.$((10 + k)).1" \
            --user-offset $((k * PER_GATEWAY)) \
            --ready-file "$out-load$k.ready" --json-out "$out-load$k.json" >"$out-load$k.log" 2>&1 &
        load_pids+=("$!")
        PIDS+=("$!")
        # One ramp at a time: six ramps at once on a small box make the shared Redis answer
        # admissions late (refusals with 503); the connections already open heartbeat meanwhile.
        wait_ready "$out-load$k.ready"
    done
    wait_ready "${ready[@]}"
    sleep "$SETTLE_SECONDS"
    local rss1=() conns=() slab1 total=0
    for k in $(seq 0 $((GATEWAYS - 1))); do
        rss1+=("$(rss_kib "${server_pids[$k]}")")
        conns+=("$(established "${ports[$k]}")")
        total=$((total + ${conns[$k]}))
    done
    slab1=$(slab_kib)
    free -m >"$out.free.txt"
    cat /proc/net/sockstat >"$out.sockstat.txt"
    for pid in "${load_pids[@]}"; do stop_pid "$pid"; done
    for pid in "${server_pids[@]}"; do stop_pid "$pid"; done
    PIDS=()
    echo "scale: $GATEWAYS gateway processes x $PER_GATEWAY connections [loadavg $load]"
    local sum_delta=0
    for k in $(seq 0 $((GATEWAYS - 1))); do
        local delta=$((${rss1[$k]} - ${rss0[$k]}))
        sum_delta=$((sum_delta + delta))
        echo "  gw-idle-$k :${ports[$k]}  ${conns[$k]} established, RSS ${rss0[$k]} -> ${rss1[$k]} KiB, $((delta * 1024 / (${conns[$k]} > 0 ? ${conns[$k]} : 1))) B/conn; load: $(python3 -c "import json;r=json.load(open('$out-load$k.json'));print(r['connections_open'],'open', 'connect', round(r['connect_ms']),'ms errors', r['errors'])")"
    done
    echo "  total $total established; gateway RSS growth $((sum_delta / 1024)) MiB = $((sum_delta * 1024 / (total > 0 ? total : 1))) B/conn; box slab growth $(((slab1 - slab0) / 1024)) MiB = $(((slab1 - slab0) * 1024 / (total > 0 ? total : 1))) B/conn (both ends)"
}

if [[ $WHAT == single || $WHAT == both ]]; then
  if [[ -z ${TABLE_ONLY:-} ]]; then
    echo "single: $IDLE_CONNECTIONS idle connections per server, heartbeat every ${HEARTBEAT_SECONDS}s, RSS read ${SETTLE_SECONDS}s after the last connect; $RUNS rounds"
    for run in $(seq "$RUNS"); do
        for server in "${SERVERS[@]}"; do
            single_round "$server" "$run" | tee -a "$RESULTS/single.txt"
        done
    done
  else
    RESULTS=$TABLE_ONLY # remake the table of an earlier run
  fi
    python3 - "$RESULTS" "$RUNS" "${SERVERS[@]}" <<'EOF' | tee "$RESULTS/results.md"
import json, statistics, sys
results, runs, servers = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
labels = {"gateway": "gateway-uring io_uring, 1 shard",
          "gateway-epoll": "gateway-uring epoll, 1 shard",
          "gateway-before": "gateway-uring io_uring, 1 shard, before (GATEWAY_BEFORE_BIN)",
          "gateway-epoll-before": "gateway-uring epoll, 1 shard, before (GATEWAY_BEFORE_BIN)",
          "tungstenite": "tokio + tokio-tungstenite",
          "fastwebsockets": "tokio + fastwebsockets", "node-ws": "Node ws", "uws": "uWebSockets.js"}
rows = {}
for s in servers:
    rs = []
    for i in range(1, runs + 1):
        try:
            rs.append(json.load(open(f"{results}/{s}-{i}.row.json")))
        except FileNotFoundError:
            pass
    if rs:
        rows[s] = rs
print("| server | established | server RSS bytes / idle connection | rounds | kernel slab bytes / connection (both ends) | RSS before connecting, MiB |")
print("|---|---|---|---|---|---|")
for s, rs in rows.items():
    m = statistics.median(r["bytes_per_connection"] for r in rs)
    each = ", ".join(f"{r['bytes_per_connection']:,.0f}" for r in rs)
    print(f"| {labels.get(s, s)} | {statistics.median(r['established'] for r in rs):,.0f} | {m:,.0f} | "
          f"{each} | "
          f"{statistics.median(r['slab_bytes_per_connection'] for r in rs):,.0f} | "
          f"{statistics.median(r['rss_before_kib'] for r in rs) / 1024:.1f} |")
if "gateway" in rows:
    g = statistics.median(r["bytes_per_connection"] for r in rows["gateway"])
    print()
    for s, rs in rows.items():
        if s != "gateway":
            p = statistics.median(r["bytes_per_connection"] for r in rs)
            print(f"- {labels.get(s, s)}: {p / g:.2f}× the gateway's bytes per connection")
    print(f"- goal ≤ 1,024 B per idle connection: gateway {g:,.0f} B → {'met' if g <= 1024 else 'not met'}")
EOF
fi
if [[ $WHAT == scale || $WHAT == both ]]; then
    scale_round | tee "$RESULTS/scale.txt"
fi
echo "raw results: $RESULTS"
