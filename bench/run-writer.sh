#!/usr/bin/env bash
# storage-writer throughput and per-stage latency at batch sizes 1, 64 and 512 (issue 4),
# side by side with the raw ceiling of each sink for the same rows in the same run:
# pipelined Redis SET NX, MongoDB insert_many, Postgres COPY. Then the writer open-loop at a
# fixed rate for the batch-latency goal. Runs alternate (writer, redis, mongo, postgres per
# batch size), RUNS times; the table is in target/bench-results/writer-*/results.md.
#
# Usage: bench/run-writer.sh [-n RUNS] [--no-build]
# Env:   RUNS (3), MESSAGES (20000), SESSIONS (200), BATCHES ("1 64 512"),
#        RATES ("10000 2000": open-loop runs, RATE_SECONDS (10) each), CARGO_TARGET_DIR, BUILD (1)
# Needs `scripts/services.sh up` (broker, Redis, Postgres, MongoDB-protocol server).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
RUNS=${RUNS:-3}
BUILD=${BUILD:-1}
while [[ $# -gt 0 ]]; do
    case "$1" in
        -n|--runs) RUNS=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
MESSAGES=${MESSAGES:-20000}
SESSIONS=${SESSIONS:-200}
BATCHES=${BATCHES:-"1 64 512"}
RATES=${RATES:-"10000 2000"}
RATE_SECONDS=${RATE_SECONDS:-10}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
RESULTS=$TARGET_DIR/bench-results/writer-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$RESULTS"
export CHATIFY_ENV_FILE=$ROOT/.local/chatify.env
[[ -f $CHATIFY_ENV_FILE ]] || { echo "run scripts/services.sh up first" >&2; exit 1; }
export RUST_LOG=${RUST_LOG:-error}

if [[ $BUILD == 1 ]]; then
    cargo build --release --locked -p chatify-bench --bin writer_bench
fi
BIN=$TARGET_DIR/release/writer_bench

{
    echo "| mode | batch | messages | throughput | time | stage p50/p99 ms ... |"
    echo "|---|---|---|---|---|---|"
} > "$RESULTS/results.md"
for run in $(seq 1 "$RUNS"); do
    for batch in $BATCHES; do
        # The writer handles a batch's records in one pass; the ceilings get the same rows
        # in chunks of the same size. 1-message batches use fewer messages (slow by design).
        messages=$MESSAGES
        [[ $batch == 1 ]] && messages=$((MESSAGES / 20))
        for mode in writer redis mongo postgres; do
            echo "run $run batch $batch $mode ($messages messages)" >&2
            "$BIN" --mode "$mode" --batch "$batch" --messages "$messages" --sessions "$SESSIONS" \
                | tee -a "$RESULTS/results.md"
        done
    done
done
for rate in $RATES; do
    echo "open loop at $rate msg/s for $RATE_SECONDS s, batch 512" >&2
    echo "open loop $rate msg/s:" >> "$RESULTS/results.md"
    "$BIN" --mode writer --batch 512 --messages $((rate * RATE_SECONDS)) --sessions "$SESSIONS" \
        --rate "$rate" | tee -a "$RESULTS/results.md"
done
echo "results: $RESULTS/results.md" >&2
