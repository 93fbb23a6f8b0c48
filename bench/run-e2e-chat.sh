#!/usr/bin/env bash
# End-to-end chat through Kafka + storage-writer (issue 7, bench item 3): persisted-and-
# delivered messages/s and send→ack latency at an offered rate (10,000 msg/s by default).
#
# Starts a deployment of its own on the shared local services (topics under a fresh prefix
# created with `fanout_bench topics`; storage-writer, storage-reader and GATEWAYS
# gateway-uring processes on free ports), then runs `loadgen chat` (pairs, open loop,
# latency from the intended send time) RUNS times against it and writes a table. An `ack`
# leaves storage-writer only once the message is in Postgres and Mongo and a `deliver` only
# after that, so acks/s is persisted msg/s and delivers/s is persisted-and-delivered msg/s.
# With several gateways, one loadgen runs per gateway (each its own pairs) and their
# results are added up.
#
# Usage: bench/run-e2e-chat.sh            (under flock /work/bench.lock when others bench)
# Env:   RUNS (3), RATE (10000, aggregate over all loadgens), CONNECTIONS (2000 per gateway),
#        DURATION (10), WARMUP (2), GRACE (30), GATEWAYS (1), SHARDS (2), CODEC (json),
#        DRAIN_MAX (600: after each run, wait at most this long for the writer's backlog to
#        drain, so runs do not measure each other), BUILD (1), CARGO_TARGET_DIR
# Needs the services of `scripts/services.sh up` (.local/chatify.env).
set -euo pipefail
# shellcheck source=bench/lib-peers.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib-peers.sh"
cd "$ROOT"

RUNS=${RUNS:-3}
RATE=${RATE:-10000}
CONNECTIONS=${CONNECTIONS:-2000}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
GRACE=${GRACE:-30}
GATEWAYS=${GATEWAYS:-1}
SHARDS=${SHARDS:-2}
CODEC=${CODEC:-json}
: "${POSTGRES_URL:?POSTGRES_URL must be set: run scripts/services.sh up}"
: "${MONGO_URL:?MONGO_URL must be set: run scripts/services.sh up}"
: "${KAFKA_BOOTSTRAP_SERVERS:?KAFKA_BOOTSTRAP_SERVERS must be set: run scripts/services.sh up}"
INTERNAL_TOKEN=bench-e2e-internal-caller-token-0123456789
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
PREFIX=bench.e2e.$STAMP
RESULTS=$TARGET_DIR/bench-results/e2e-chat-$STAMP
mkdir -p "$RESULTS"
ulimit -n 20000 2>/dev/null || true

if [[ ${BUILD:-1} == 1 ]]; then
    echo "building release binaries..."
    CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -q -p gateway-uring -p storage-writer \
        -p storage-reader -p loadgen
    CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -q -p chatify-bench --bin fanout_bench
fi
for bin in gateway-uring storage-writer storage-reader loadgen fanout_bench; do
    [[ -x $BIN/$bin ]] || { echo "missing $BIN/$bin" >&2; exit 1; }
done

PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do stop_pid "$pid"; done; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# Messages the writer has handled (every outcome), from its /metrics.
writer_handled() {
    curl -fsS "http://127.0.0.1:$WRITER_ADMIN/metrics" 2>/dev/null |
        awk '/^chatify_writer_messages_total/ { n += $NF } END { printf "%d\n", n }'
}
# Waits until the writer has handled nothing new for 5 s (its backlog is drained), so a run
# never measures the one before (at most DRAIN_MAX seconds).
wait_drained() {
    local last=-1 still=0 now
    for _ in $(seq "${DRAIN_MAX:-600}"); do
        now=$(writer_handled)
        if [[ $now == "$last" ]]; then still=$((still + 1)); else still=0; fi
        [[ $still -ge 5 ]] && { echo "writer drained: $now messages handled in all"; return 0; }
        last=$now
        sleep 1
    done
    echo "writer still busy after ${DRAIN_MAX:-600} s (handled $now); the next run starts anyway" >&2
}
wait_ready() { # name admin-port pid
    for _ in $(seq 900); do
        if curl -fsS "http://127.0.0.1:$2/readyz" >/dev/null 2>&1; then return 0; fi
        kill -0 "$3" 2>/dev/null || { echo "$1 exited before it was ready (log: $RESULTS/$1.log)" >&2; return 1; }
        sleep 0.1
    done
    echo "$1 not ready in 90 s (log: $RESULTS/$1.log)" >&2
    return 1
}

NODES=()
for k in $(seq 1 "$GATEWAYS"); do NODES+=("e2e-$k"); done
node_args=()
for node in "${NODES[@]}"; do node_args+=(--node "$node"); done
"$BIN/fanout_bench" topics --prefix "$PREFIX" "${node_args[@]}" 2>"$RESULTS/topics.log"

common_env=(KAFKA_BOOTSTRAP_SERVERS="$KAFKA_BOOTSTRAP_SERVERS" REDIS_URL="$REDIS_URL"
    POSTGRES_URL="$POSTGRES_URL" MONGO_URL="$MONGO_URL" CHATIFY_TOPIC_PREFIX="$PREFIX"
    JWT_SECRET="$JWT_SECRET" RUST_LOG=warn)

port=$(free_port)
env -i PATH="$PATH" "${common_env[@]}" CHATIFY_ADMIN_ADDR=127.0.0.1:$port \
    CHATIFY_WRITER_GROUP="$PREFIX-writers" "$BIN/storage-writer" >"$RESULTS/writer.log" 2>&1 &
PIDS+=("$!")
WRITER_PID=$!
WRITER_ADMIN=$port
wait_ready writer "$port" "$WRITER_PID"

port=$(free_port)
grpc=$(free_port)
env -i PATH="$PATH" "${common_env[@]}" CHATIFY_ADMIN_ADDR=127.0.0.1:$port \
    CHATIFY_GRPC_ADDR=127.0.0.1:$grpc CHATIFY_INTERNAL_TOKEN=$INTERNAL_TOKEN \
    "$BIN/storage-reader" >"$RESULTS/reader.log" 2>&1 &
PIDS+=("$!")
wait_ready reader "$port" "$!"

WS=()
GATEWAY_PIDS=()
for node in "${NODES[@]}"; do
    ws=$(free_port) tcp=$(free_port) admin=$(free_port)
    # The per-user send limit is raised so the offered rate, not the limiter, is measured.
    env -i PATH="$PATH" "${common_env[@]}" CHATIFY_NODE_ID="$node" CHATIFY_WS_ADDR=127.0.0.1:$ws \
        CHATIFY_TCP_ADDR=127.0.0.1:$tcp CHATIFY_ADMIN_ADDR=127.0.0.1:$admin CHATIFY_SHARDS="$SHARDS" \
        CHATIFY_READER_URL=http://127.0.0.1:$grpc CHATIFY_INTERNAL_TOKEN=$INTERNAL_TOKEN \
        CHATIFY_SEND_RATE_PER_SECOND=1000 CHATIFY_SEND_BURST=2000 \
        "$BIN/gateway-uring" >"$RESULTS/gateway-$node.log" 2>&1 &
    PIDS+=("$!")
    GATEWAY_PIDS+=("$!")
    wait_ready "gateway-$node" "$admin" "$!"
    WS+=("$ws")
done

{
    machine_line
    echo "commit $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo ' + working tree')"
    echo "rate $RATE msg/s offered, $CONNECTIONS connections per gateway x $GATEWAYS gateway(s) ($SHARDS shards), codec $CODEC, ${WARMUP}s warm-up + ${DURATION}s measured + ${GRACE}s grace, $RUNS runs"
} | tee "$RESULTS/setup.txt"

per_gateway_rate=$(python3 -c "print($RATE / $GATEWAYS)")
for run in $(seq "$RUNS"); do
    load=$(cut -d' ' -f1-3 /proc/loadavg)
    writer_cpu0=$(cpu_seconds "$WRITER_PID")
    LOAD_PIDS=()
    for k in "${!NODES[@]}"; do
        # Each loadgen its own source addresses, so ports never run short.
        "$BIN/loadgen" chat --target "ws://127.0.0.1:${WS[$k]}/ws" --codec "$CODEC" \
            -n "$CONNECTIONS" --rate "$per_gateway_rate" --duration "$DURATION" --warmup "$WARMUP" \
            --grace "$GRACE" --local-addr "127.0.$((20 + k)).1" --local-addr "127.0.$((20 + k)).2" \
            --quiet --json "$RESULTS/run$run-gw$k.json" >"$RESULTS/run$run-gw$k.txt" 2>&1 &
        LOAD_PIDS+=("$!")
    done
    for pid in "${LOAD_PIDS[@]}"; do wait "$pid" || echo "loadgen $pid failed (see $RESULTS/run$run-*.txt)"; done
    writer_cpu1=$(cpu_seconds "$WRITER_PID")
    echo "run $run: load average before $load; writer CPU $(python3 -c "print(round($writer_cpu1 - $writer_cpu0, 1))") s"
    echo "$load" >"$RESULTS/run$run.loadavg"
    wait_drained
done

python3 - "$RESULTS" "$RUNS" "$GATEWAYS" <<'EOF' | tee "$RESULTS/results.md"
import json, statistics, sys
results, runs, gateways = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows = []
for run in range(1, runs + 1):
    parts = []
    for k in range(gateways):
        try:
            parts.append(json.load(open(f"{results}/run{run}-gw{k}.json")))
        except (FileNotFoundError, json.JSONDecodeError):
            pass
    if not parts:
        continue
    tp = lambda key: sum(p["throughput_per_second"][key] for p in parts)
    count = lambda key: sum(p["counts"].get(key, 0) for p in parts)
    corr = lambda key: sum((p.get("correctness") or {}).get(key, 0) for p in parts)
    # Percentiles of the first loadgen (one gateway: exact; several: the first's share).
    lat = parts[0]["latency_us"]
    errors = {}
    for p in parts:
        for label, n in p.get("errors", {}).items():
            errors[label] = errors.get(label, 0) + n
    rows.append({
        "run": run, "sent": tp("sent"), "acks": tp("acks"), "delivers": tp("delivers"),
        "ack_p50_ms": lat.get("ack", {}).get("p50", 0) / 1000, "ack_p99_ms": lat.get("ack", {}).get("p99", 0) / 1000,
        "deliver_p99_ms": lat.get("deliver", {}).get("p99", 0) / 1000,
        "sent_total": count("sent"), "acked": corr("acked"), "lost": corr("lost"),
        "duplicates": corr("duplicates"), "seq_gaps": corr("seq_gaps"), "unanswered": corr("unanswered"),
        "connected": sum(p["connections"]["connected"] for p in parts), "errors": errors,
        "loadavg": open(f"{results}/run{run}.loadavg").read().strip(),
    })
print("| run | connected | sent/s (offered) | acks/s (persisted) | delivers/s (persisted and delivered) | send→ack p50 / p99 ms | send→deliver p99 ms | sent | acked | unanswered | lost | dup | gaps | errors | load avg before |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['run']} | {r['connected']:,} | {r['sent']:,.0f} | {r['acks']:,.0f} | {r['delivers']:,.0f} | "
          f"{r['ack_p50_ms']:,.1f} / {r['ack_p99_ms']:,.1f} | {r['deliver_p99_ms']:,.1f} | {r['sent_total']:,} | "
          f"{r['acked']:,} | {r['unanswered']:,} | {r['lost']:,} | {r['duplicates']:,} | {r['seq_gaps']:,} | "
          f"{r['errors'] or '-'} | {r['loadavg']} |")
if rows:
    med = lambda key: statistics.median(r[key] for r in rows)
    print(f"\nmedian of {len(rows)}: acks/s {med('acks'):,.0f}, delivers/s {med('delivers'):,.0f}, "
          f"send→ack p99 {med('ack_p99_ms'):,.1f} ms, send→deliver p99 {med('deliver_p99_ms'):,.1f} ms")
EOF
echo "results: $RESULTS"
