# Shared by bench/run-peers.sh and bench/run-idle.sh (sourced, not run): the servers under
# comparison, how each is started, the Node peers' install, /proc readers.
#
# Servers (names used in SERVERS=...):
#   gateway        gateway-uring, io_uring, CHATIFY_SHARDS=1 (one server core)
#   gateway-epoll  gateway-uring, monoio's epoll driver (CHATIFY_IO_DRIVER=legacy), 1 shard
#   gateway-2core  gateway-uring, io_uring, CHATIFY_SHARDS=2, not pinned (both cores)
#   gateway-signal, gateway-coop
#                  gateway with CHATIFY_URING_TASKRUN=signal (the kernel's default: an IPI per
#                  completion queued from the other core) / coop; `gateway` runs the default, defer
#   gateway-before, gateway-epoll-before
#                  the same as gateway / gateway-epoll with the binary GATEWAY_BEFORE_BIN (an
#                  earlier build, for before/after comparisons in one run)
#   tungstenite    bench/src/bin/ws_ping_baseline.rs (tokio + tokio-tungstenite)
#   fastwebsockets bench/src/bin/ws_ping_fastwebsockets.rs (tokio + hyper + fastwebsockets)
#   node-ws        bench/node/ws_server.js (Node, npm `ws`)
#   uws            bench/node/uws_server.js (Node, uWebSockets.js)
# shellcheck shell=bash

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET_DIR/release
NODE_CACHE=${NODE_CACHE:-$HOME/.cache/chatify/bench-node}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
CLK_TCK=$(getconf CLK_TCK)

if [[ -f $ROOT/.local/chatify.env ]]; then
    set -a
    # shellcheck disable=SC1091
    source "$ROOT/.local/chatify.env"
    set +a
fi
export JWT_SECRET=${JWT_SECRET:-chatify-bench-secret-0123456789abcdef}

# Installs the pinned Node peers (bench/node/package.json) into $NODE_CACHE, outside the repo.
install_node_peers() {
    mkdir -p "$NODE_CACHE"
    if ! cmp -s "$ROOT/bench/node/package.json" "$NODE_CACHE/package.json" \
        || [[ ! -d $NODE_CACHE/node_modules/ws || ! -d $NODE_CACHE/node_modules/uWebSockets.js ]]; then
        cp "$ROOT/bench/node/package.json" "$NODE_CACHE/package.json"
        (cd "$NODE_CACHE" && npm install --no-audit --no-fund --loglevel=error)
    fi
    echo "node $(node --version); ws $(node -p "require('$NODE_CACHE/node_modules/ws/package.json').version");" \
        "uWebSockets.js $(node -p "require('$NODE_CACHE/node_modules/uWebSockets.js/package.json').version")"
}

build_binaries() {
    if [[ ${BUILD:-1} == 1 ]]; then
        echo "building release binaries (gateway-uring, chatify-bench)..."
        CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -q -p gateway-uring --bin gateway-uring
        CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -q -p chatify-bench \
            --bin ws_ping_baseline --bin ws_ping_fastwebsockets --bin ws_ping_load
    fi
    for bin in gateway-uring ws_ping_baseline ws_ping_fastwebsockets ws_ping_load; do
        [[ -x $BIN/$bin ]] || { echo "missing $BIN/$bin" >&2; exit 1; }
    done
}

# start_server NAME PORT LOG [NODE_ID]: starts it in the background, sets SERVER_PID.
start_server() {
    local name=$1 port=$2 log=$3 node_id=${4:-gw-bench}
    local pin=(taskset -c "$SERVER_CPU")
    case "$name" in
        gateway | gateway-epoll | gateway-2core | gateway-before | gateway-epoll-before | gateway-signal | gateway-coop)
            : "${REDIS_URL:?REDIS_URL must be set (the gateway checks the token deny-list in Redis)}"
            local driver=uring shards=1 binary=$BIN/gateway-uring taskrun=defer
            [[ $name == gateway-signal ]] && taskrun=signal
            [[ $name == gateway-coop ]] && taskrun=coop
            if [[ $name == *-before ]]; then
                binary=${GATEWAY_BEFORE_BIN:?GATEWAY_BEFORE_BIN must name the earlier gateway-uring binary}
            fi
            [[ $name == gateway-epoll || $name == gateway-epoll-before ]] && driver=legacy
            [[ $name == gateway-2core ]] && { shards=2; pin=(); }
            CHATIFY_NODE_ID=$node_id CHATIFY_WS_ADDR=127.0.0.1:$port \
                CHATIFY_TCP_ADDR=127.0.0.1:$((port + 1000)) CHATIFY_ADMIN_ADDR=127.0.0.1:$((port + 2000)) \
                CHATIFY_SHARDS=$shards CHATIFY_IO_DRIVER=$driver CHATIFY_URING_TASKRUN=$taskrun RUST_LOG=warn \
                "${pin[@]}" "$binary" >"$log" 2>&1 &
            ;;
        tungstenite)
            "${pin[@]}" "$BIN/ws_ping_baseline" --listen "127.0.0.1:$port" --worker-threads 1 >"$log" 2>&1 &
            ;;
        fastwebsockets)
            "${pin[@]}" "$BIN/ws_ping_fastwebsockets" --listen "127.0.0.1:$port" --worker-threads 1 >"$log" 2>&1 &
            ;;
        node-ws)
            NODE_PATH=$NODE_CACHE/node_modules LISTEN=127.0.0.1:$port \
                "${pin[@]}" node "$ROOT/bench/node/ws_server.js" >"$log" 2>&1 &
            ;;
        uws)
            NODE_PATH=$NODE_CACHE/node_modules LISTEN=127.0.0.1:$port \
                "${pin[@]}" node "$ROOT/bench/node/uws_server.js" >"$log" 2>&1 &
            ;;
        *) echo "unknown server $name" >&2; return 2 ;;
    esac
    SERVER_PID=$!
    wait_port "$port" "$SERVER_PID"
}

server_label() {
    case "$1" in
        gateway) echo "gateway-uring io_uring, 1 shard" ;;
        gateway-epoll) echo "gateway-uring epoll, 1 shard" ;;
        gateway-2core) echo "gateway-uring io_uring, 2 shards, both cores" ;;
        gateway-signal) echo "gateway-uring io_uring, 1 shard, task run: signal" ;;
        gateway-coop) echo "gateway-uring io_uring, 1 shard, task run: coop" ;;
        gateway-before) echo "gateway-uring io_uring, 1 shard, before (GATEWAY_BEFORE_BIN)" ;;
        gateway-epoll-before) echo "gateway-uring epoll, 1 shard, before (GATEWAY_BEFORE_BIN)" ;;
        tungstenite) echo "tokio + tokio-tungstenite" ;;
        fastwebsockets) echo "tokio + fastwebsockets" ;;
        node-ws) echo "Node ws" ;;
        uws) echo "uWebSockets.js" ;;
        *) echo "$1" ;;
    esac
}

wait_port() { # port pid
    for _ in $(seq 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        kill -0 "$2" 2>/dev/null || { echo "server exited before listening on :$1" >&2; return 1; }
        sleep 0.05
    done
    echo "timed out waiting for :$1" >&2
    return 1
}

stop_pid() { # pid
    local pid=$1
    [[ -n $pid ]] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

# CPU seconds (user + system, all threads) a process has used so far.
cpu_seconds() { awk -v hz="$CLK_TCK" '{ sub(/^.*\) /, ""); printf "%.3f", ($12 + $13) / hz }' "/proc/$1/stat"; }
# Resident set, KiB.
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

machine_line() {
    echo "$(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), kernel $(uname -r), loopback"
}
