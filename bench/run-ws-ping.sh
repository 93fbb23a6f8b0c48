#!/usr/bin/env bash
# JSON ping frames/s at 1,000 WebSocket connections (issue 3): gateway-uring (io_uring, and
# the epoll driver) against a tokio + tokio-tungstenite baseline, measured by the same load
# client (bench/src/bin/ws_ping_load.rs) in the same run. Results: target/bench-results/.
#
# Usage: bench/run-ws-ping.sh [-n RUNS] [--no-epoll] [--no-build]
# Env:   RUNS (3), CONNECTIONS (1000), IN_FLIGHT (8), WARMUP_SECONDS (3), MEASURE_SECONDS (10),
#        CARGO_TARGET_DIR (target), EPOLL (1 = also run the gateway with CHATIFY_IO_DRIVER=legacy),
#        BUILD (1; 0 = use the release binaries already in the target dir)
# Needs Redis (REDIS_URL in .local/chatify.env): the gateway checks the token deny-list at connect.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

RUNS=${RUNS:-3}
EPOLL=${EPOLL:-1}
BUILD=${BUILD:-1}
while [[ $# -gt 0 ]]; do
    case "$1" in
        -n|--runs) RUNS=$2; shift 2 ;;
        --no-epoll) EPOLL=0; shift ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
CONNECTIONS=${CONNECTIONS:-1000}
IN_FLIGHT=${IN_FLIGHT:-8}
WARMUP_SECONDS=${WARMUP_SECONDS:-3}
SECONDS_MEASURED=${MEASURE_SECONDS:-10}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
RESULTS=$TARGET_DIR/bench-results/ws-ping-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$RESULTS"

if [[ -f .local/chatify.env ]]; then
    set -a
    # shellcheck disable=SC1091
    source .local/chatify.env
    set +a
fi
: "${REDIS_URL:?REDIS_URL must be set (the gateway checks the token deny-list in Redis)}"
export JWT_SECRET=${JWT_SECRET:-chatify-bench-secret-0123456789abcdef}

GW_WS=127.0.0.1:18080
BASE_WS=127.0.0.1:18090
ulimit -n 20000 2>/dev/null || true

BIN=$TARGET_DIR/release
if [[ "$BUILD" == 1 ]]; then
    echo "building release binaries (gateway-uring, chatify-bench)..."
    CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -q -p gateway-uring -p chatify-bench --bins
else
    echo "not building; using the binaries in $BIN:"
fi
for bin in gateway-uring ws_ping_baseline ws_ping_load; do
    [[ -x "$BIN/$bin" ]] || { echo "missing $BIN/$bin" >&2; exit 1; }
done
stat -c "%y %s %n" "$BIN"/{gateway-uring,ws_ping_baseline,ws_ping_load} | tee "$RESULTS/binaries.txt"
git rev-parse HEAD >>"$RESULTS/binaries.txt" 2>/dev/null || true

SERVER_PID=
stop_server() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=
}
trap stop_server EXIT

wait_port() { # host:port
    local host=${1%:*} port=${1##*:}
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then return 0; fi
        kill -0 "$SERVER_PID" 2>/dev/null || { echo "server exited before listening" >&2; return 1; }
        sleep 0.1
    done
    echo "timed out waiting for $1" >&2
    return 1
}

start_gateway() { # driver (uring|legacy)
    JWT_SECRET=$JWT_SECRET REDIS_URL=$REDIS_URL \
        CHATIFY_WS_ADDR=$GW_WS CHATIFY_TCP_ADDR=127.0.0.1:18081 CHATIFY_ADMIN_ADDR=127.0.0.1:19101 \
        CHATIFY_SHARDS=2 CHATIFY_IO_DRIVER=$1 RUST_LOG=warn \
        "$BIN/gateway-uring" >"$RESULTS/server-gateway-$1.log" 2>&1 &
    SERVER_PID=$!
    wait_port "$GW_WS"
}

start_baseline() {
    JWT_SECRET=$JWT_SECRET "$BIN/ws_ping_baseline" --listen "$BASE_WS" \
        >"$RESULTS/server-baseline.log" 2>&1 &
    SERVER_PID=$!
    wait_port "$BASE_WS"
}

load() { # label url json
    "$BIN/ws_ping_load" --target "$2" --label "$1" --connections "$CONNECTIONS" \
        --in-flight "$IN_FLIGHT" --warmup-seconds "$WARMUP_SECONDS" --seconds "$SECONDS_MEASURED" \
        --json-out "$3"
}

COLUMNS_RUN=(uring baseline)
[[ "$EPOLL" == 1 ]] && COLUMNS_RUN=(uring epoll baseline)

echo "machine: $(nproc) cores shared by the load client and the server, loopback; $(uname -r)"
echo "load: $CONNECTIONS connections x $IN_FLIGHT pings in flight, ${WARMUP_SECONDS}s warm-up, ${SECONDS_MEASURED}s measured, $RUNS runs"
for run in $(seq "$RUNS"); do
    for column in "${COLUMNS_RUN[@]}"; do
        case "$column" in
            uring) start_gateway uring; url=ws://$GW_WS/ws; label=gateway-uring-io_uring ;;
            epoll) start_gateway legacy; url=ws://$GW_WS/ws; label=gateway-uring-epoll ;;
            baseline) start_baseline; url=ws://$BASE_WS/ws; label=tokio-tungstenite ;;
        esac
        # The load average shows whether anything else (a build) competed for the cores.
        printf 'run %s  [loadavg %s]  ' "$run" "$(cut -d' ' -f1 /proc/loadavg)"
        load "$label" "$url" "$RESULTS/$column-$run.json"
        # Server CPU seconds (user + system) over its whole life: start, connect, warm-up, load.
        server_cpu=$(awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$SERVER_PID/stat")
        echo "        server CPU ${server_cpu}s" | tee "$RESULTS/$column-$run.cpu"
        stop_server
        sleep 1 # let TIME_WAIT sockets and the kernel settle between servers
    done
done

# Medians per column, side by side.
python3 - "$RESULTS" "$RUNS" "${COLUMNS_RUN[@]}" <<'EOF'
import json, statistics, sys
results, runs, columns = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
rows = {}
for c in columns:
    rs = [json.load(open(f"{results}/{c}-{i}.json")) for i in range(1, runs + 1)]
    rows[c] = {
        "label": rs[0]["label"],
        "pongs_per_second": statistics.median(r["pongs_per_second"] for r in rs),
        "p50_us": statistics.median(r["latency_us"]["p50"] for r in rs),
        "p99_us": statistics.median(r["latency_us"]["p99"] for r in rs),
        "p999_us": statistics.median(r["latency_us"]["p999"] for r in rs),
        "connect_ms": statistics.median(r["connect_ms"] for r in rs),
        "errors": sum(sum(r["errors"].values()) for r in rs),
        "runs_pongs_per_second": [round(r["pongs_per_second"]) for r in rs],
        "server_cpu_seconds": statistics.median(
            float(open(f"{results}/{c}-{i}.cpu").read().split()[2].rstrip("s"))
            for i in range(1, runs + 1)),
    }
base = rows.get("baseline", {}).get("pongs_per_second") or 0
print()
print(f"median of {runs} runs (client and server share the same {__import__('os').cpu_count()} cores):")
print(f"{'server':<26}{'pongs/s':>10}{'p50 µs':>9}{'p99 µs':>9}{'p99.9 µs':>10}{'connect ms':>12}{'errors':>8}{'server CPU s':>14}{'vs baseline':>13}  runs pongs/s")
for c in columns:
    r = rows[c]
    ratio = f"{r['pongs_per_second'] / base:.2f}x" if base else "-"
    print(f"{r['label']:<26}{r['pongs_per_second']:>10.0f}{r['p50_us']:>9.0f}{r['p99_us']:>9.0f}"
          f"{r['p999_us']:>10.0f}{r['connect_ms']:>12.0f}{r['errors']:>8}{r['server_cpu_seconds']:>14.2f}{ratio:>13}  {r['runs_pongs_per_second']}")
json.dump(rows, open(f"{results}/summary.json", "w"), indent=2)
print(f"\nraw results: {results}")
EOF
