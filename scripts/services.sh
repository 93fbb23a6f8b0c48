#!/usr/bin/env bash
# Chatify local backing services: one entry point to bring the real services
# the backend talks to up on loopback, tear down what we started, and report.
#
#   scripts/services.sh up       start/reuse everything, create topics, migrate
#   scripts/services.sh down     stop only what `up` started (by PID file)
#   scripts/services.sh status   per service: up/down, owner, address
#   scripts/services.sh env      print the path of the env file `up` writes
#
# Services (each reuses what already answers on its port, else starts ours):
#   Kafka protocol  tansu 0.6.0 broker, SQLite storage      127.0.0.1:9092
#   MongoDB         SecantusDB (PyPI) in a cached venv       127.0.0.1:27017
#   Redis           pre-existing 127.0.0.1:6379 if it answers, else ours :6380
#   PostgreSQL      pre-existing 127.0.0.1:5432 if ready,   else ours :5433
# "Ours" = started by this checkout: PID (and port) in .local/pids/; only
# those are ever stopped. State lives in .local/ (git-ignored).
#
# Knobs (all optional):
#   CHATIFY_OWN_REDIS=1 / CHATIFY_OWN_POSTGRES=1  never reuse a pre-existing one
#   CHATIFY_SKIP_MIGRATE=1                        don't run chatify-migrate
#   CHATIFY_TOPIC_PREFIX (chatify)                CHATIFY_CACHE_DIR (~/.cache/chatify)
#   CHATIFY_KAFKA_PORT (9092)  CHATIFY_MONGO_PORT (27017)
#   CHATIFY_SHARED_REDIS_PORT (6379)    CHATIFY_OWN_REDIS_PORT (6380)
#   CHATIFY_SHARED_POSTGRES_PORT (5432) CHATIFY_OWN_POSTGRES_PORT (5433)
#   CHATIFY_WAIT_SECONDS (60)  CHATIFY_TANSU_WAIT_SECONDS (120)
set -euo pipefail

# Topics the backend expects, as "suffix:partitions". The broker does not
# auto-create topics, so `up` creates every one of these that is missing.
# BEWARE: in tansu 0.6.0 deleting ANY topic deletes EVERY topic of the
# cluster (its topic_delete_by.sql filters on the cluster only), so a test
# that deletes its scratch topic wipes these too; re-run `up` to restore.
TOPIC_SPECS=(
  "upstream:8"
  "upstream.dlq:2"
  "user-events:4"
  "message-events:4"
  "push.gw-1:4"
  "push.gw-2:4"
)

TANSU_VERSION=0.6.0
TANSU_FEATURES=dynostore,libsql

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(git -C "$SCRIPT_DIR" rev-parse --show-toplevel 2>/dev/null || (cd "$SCRIPT_DIR/.." && pwd))
LOCAL="$REPO/.local"
PIDS="$LOCAL/pids"
LOGS="$LOCAL/logs"
ENV_FILE="$LOCAL/chatify.env"
# Machine-wide cache so every clone on this machine shares one venv.
CACHE_DIR="${CHATIFY_CACHE_DIR:-$HOME/.cache/chatify}"
VENV="$CACHE_DIR/venv"

HOST=127.0.0.1
TOPIC_PREFIX="${CHATIFY_TOPIC_PREFIX:-chatify}"
KAFKA_PORT="${CHATIFY_KAFKA_PORT:-9092}"
MONGO_PORT="${CHATIFY_MONGO_PORT:-27017}"
SHARED_REDIS_PORT="${CHATIFY_SHARED_REDIS_PORT:-6379}"
OWN_REDIS_PORT="${CHATIFY_OWN_REDIS_PORT:-6380}"
SHARED_PG_PORT="${CHATIFY_SHARED_POSTGRES_PORT:-5432}"
OWN_PG_PORT="${CHATIFY_OWN_POSTGRES_PORT:-5433}"
WAIT_SECONDS="${CHATIFY_WAIT_SECONDS:-60}"
TANSU_WAIT_SECONDS="${CHATIFY_TANSU_WAIT_SECONDS:-120}"

TANSU_DIR="$LOCAL/tansu"
TANSU_LOG="$TANSU_DIR/tansu.log"
TANSU_BROKER_URL="tcp://$HOST:$KAFKA_PORT"
MONGO_DIR="$LOCAL/mongo"
MONGO_LOG="$LOGS/mongo.log"
REDIS_DIR="$LOCAL/redis"
REDIS_LOG="$LOGS/redis.log"
PG_LOG="$LOGS/postgres.log"

# Chosen by the ensure_* functions during `up`.
KAFKA_OWNER=""
MONGO_OWNER=""
REDIS_PORT=""
REDIS_OWNER=""
PG_PORT=""
PG_OWNER=""
PG_DATA=""

# ---------------------------------------------------------------- helpers ---

log() { printf '[services] %s\n' "$*" >&2; }
die() { printf '[services] ERROR: %s\n' "$*" >&2; exit 1; }

# Print the tail of a service's log and fail, naming the service.
fail_with_log() {
  local service=$1 logfile=$2 msg=$3
  if [[ -f $logfile ]]; then
    printf '[services] ---- last lines of %s ----\n' "$logfile" >&2
    tail -n 30 "$logfile" >&2 || true
    printf '[services] ----\n' >&2
  fi
  die "$service: $msg"
}

as_root() {
  if [[ $EUID -eq 0 ]]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else die "need root (or sudo) to run: $*"
  fi
}

APT_UPDATED=0
apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install manually: $*"
  log "installing with apt-get: $*"
  if [[ $APT_UPDATED -eq 0 ]]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    APT_UPDATED=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# True if something accepts TCP connections on 127.0.0.1:$1 (no extra tools).
port_open() {
  timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$1" 2>/dev/null
}

# PID files: $PIDS/<name>.pid. A PID only counts as ours if the process is
# alive AND its command line still matches, so a recycled PID is never hit.
pid_file() { printf '%s/%s.pid' "$PIDS" "$1"; }

# our_pid NAME PATTERN -> prints the PID and succeeds if ours is running.
our_pid() {
  local file pid
  file=$(pid_file "$1")
  [[ -s $file ]] || return 1
  pid=$(head -n1 "$file")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$2" || return 1
  printf '%s' "$pid"
}

# spawn NAME WORKDIR LOGFILE CMD... : start CMD detached in its own session
# (so it outlives this script and its terminal), in WORKDIR, appending to
# LOGFILE; the child writes its own PID before exec'ing, so the PID file
# holds the real server PID.
spawn() {
  local name=$1 workdir=$2 logfile=$3
  shift 3
  mkdir -p "$PIDS" "$(dirname "$logfile")"
  local pidfile
  pidfile=$(pid_file "$name")
  rm -f "$pidfile"
  (
    cd "$workdir"
    # Close the lock fds (8, 9): a daemon inheriting them would hold our
    # flock forever and block every later up/down.
    # shellcheck disable=SC2016  # $$ and $@ expand in the child shell
    setsid nohup bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "$@" \
      </dev/null >>"$logfile" 2>&1 8>&- 9>&- &
  )
  local i
  for ((i = 0; i < 50; i++)); do
    [[ -s $pidfile ]] && return 0
    sleep 0.1
  done
  fail_with_log "$name" "$logfile" "process did not start"
}

# wait_until SERVICE LOGFILE TIMEOUT PIDNAME PATTERN CHECK... : poll CHECK
# every second; give up (with the log tail) on timeout or if our process died.
wait_until() {
  local service=$1 logfile=$2 timeout=$3 pidname=$4 pattern=$5
  shift 5
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if [[ -n $pidname ]] && ! our_pid "$pidname" "$pattern" >/dev/null; then
      fail_with_log "$service" "$logfile" "process exited before becoming ready"
    fi
    ((SECONDS < deadline)) || fail_with_log "$service" "$logfile" "not ready after ${timeout}s"
    sleep 1
  done
}

# The port each of our services was started on is kept beside its PID file,
# so `up`/`status` talk to the running instance even if CHATIFY_*_PORT
# changed since.
record_port() { printf '%s\n' "$2" >"$PIDS/$1.port"; }
recorded_port() { # recorded_port NAME PATTERN — only while that process runs
  our_pid "$1" "$2" >/dev/null && [[ -s $PIDS/$1.port ]] && head -n1 "$PIDS/$1.port"
}
load_recorded_ports() {
  local p
  if p=$(recorded_port tansu "tansu broker"); then KAFKA_PORT=$p; fi
  if p=$(recorded_port mongo secantusd-py); then MONGO_PORT=$p; fi
  if p=$(recorded_port redis redis-server); then OWN_REDIS_PORT=$p; fi
  if p=$(recorded_port postgres "postgres -D"); then OWN_PG_PORT=$p; fi
  TANSU_BROKER_URL="tcp://$HOST:$KAFKA_PORT"
}

# stop_ours NAME PATTERN SIGNAL TIMEOUT : signal our process, wait for it to
# exit (SIGKILL after TIMEOUT), drop the PID file. No-op if not running.
stop_ours() {
  local name=$1 pattern=$2 sig=$3 timeout=$4 pid
  if ! pid=$(our_pid "$name" "$pattern"); then
    rm -f "$(pid_file "$name")" "$PIDS/$name.port"
    return 0
  fi
  log "stopping $name (pid $pid)"
  kill "-$sig" "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + timeout))
  while kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      log "$name did not exit after ${timeout}s, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 1
      break
    fi
    sleep 0.5
  done
  rm -f "$(pid_file "$name")" "$PIDS/$name.port"
}

ensure_gitignore() {
  local gi="$REPO/.gitignore"
  if ! grep -qxF '.local/' "$gi" 2>/dev/null && ! grep -qxF '/.local/' "$gi" 2>/dev/null; then
    # Keep the file newline-terminated before appending.
    if [[ -s $gi && -n $(tail -c1 "$gi") ]]; then echo >>"$gi"; fi
    echo '.local/' >>"$gi"
  fi
}

# ------------------------------------------------------------------ redis ---

redis_ping() { # redis_ping PORT — RESP PING over /dev/tcp, no redis-cli needed
  # shellcheck disable=SC2016  # expanded by the inner bash
  timeout 2 bash -c '
    exec 3<>"/dev/tcp/$0/$1" || exit 1
    printf "PING\r\n" >&3
    IFS= read -r reply <&3
    [[ $reply == "+PONG"* ]]' "$HOST" "$1" 2>/dev/null
}

ensure_redis() {
  if our_pid redis redis-server >/dev/null; then
    REDIS_PORT=$OWN_REDIS_PORT REDIS_OWNER=ours
    log "redis: reusing ours on $HOST:$REDIS_PORT"
  elif [[ ${CHATIFY_OWN_REDIS:-0} != 1 ]] && redis_ping "$SHARED_REDIS_PORT"; then
    REDIS_PORT=$SHARED_REDIS_PORT REDIS_OWNER=pre-existing
    log "redis: reusing pre-existing $HOST:$REDIS_PORT"
    return 0
  else
    REDIS_PORT=$OWN_REDIS_PORT REDIS_OWNER=ours
    if port_open "$REDIS_PORT"; then
      die "redis: port $REDIS_PORT is taken by something we did not start (set CHATIFY_OWN_REDIS_PORT)"
    fi
    command -v redis-server >/dev/null 2>&1 || apt_install redis-server
    mkdir -p "$REDIS_DIR" "$LOGS" "$PIDS"
    log "redis: starting ours on $HOST:$REDIS_PORT (data $REDIS_DIR)"
    # Foreground under spawn (not --daemonize) so the PID file is exact.
    # AOF on: the data dir survives restarts like a real deployment.
    spawn redis "$REDIS_DIR" "$REDIS_LOG" redis-server \
      --bind "$HOST" --port "$REDIS_PORT" --dir "$REDIS_DIR" \
      --appendonly yes --daemonize no --protected-mode yes --logfile ""
    record_port redis "$REDIS_PORT"
  fi
  wait_until redis "$REDIS_LOG" "$WAIT_SECONDS" redis redis-server redis_ping "$REDIS_PORT"
}

# ------------------------------------------------------------- postgresql ---

pg_bin_dir() { # newest installed server's bin dir (Debian layout)
  local d
  d=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n1)
  [[ -n $d && -x $d/initdb ]] && printf '%s' "$d"
}

pg_ready() { # pg_ready PORT
  if command -v pg_isready >/dev/null 2>&1; then
    pg_isready -q -h "$HOST" -p "$1" -U postgres -t 2
  else
    port_open "$1"
  fi
}

# Run a command as the postgres OS user: initdb/postgres refuse to run as root.
# cwd / so it never warns about a cwd it cannot enter.
as_pg() {
  if [[ $EUID -eq 0 ]]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

# The cluster lives in .local/postgres, but the postgres user must be able to
# reach it; a clone under e.g. /root (mode 700) is not reachable, so then we
# fall back to a per-repo dir under /var/tmp rather than loosen /root.
choose_pg_data() {
  PG_DATA="${CHATIFY_PG_DATA:-$LOCAL/postgres}"
  if [[ -z ${CHATIFY_PG_DATA:-} && $EUID -eq 0 ]] && ! runuser -u postgres -- test -x "$LOCAL"; then
    PG_DATA="/var/tmp/chatify-$(printf '%s' "$REPO" | md5sum | cut -c1-12)/postgres"
    PG_LOG="$(dirname "$PG_DATA")/postgres.log"
  fi
}

ensure_postgres() {
  choose_pg_data
  if our_pid postgres "postgres -D" >/dev/null; then
    PG_PORT=$OWN_PG_PORT PG_OWNER=ours
    log "postgres: reusing ours on $HOST:$PG_PORT"
  elif [[ ${CHATIFY_OWN_POSTGRES:-0} != 1 ]] && pg_ready "$SHARED_PG_PORT"; then
    PG_PORT=$SHARED_PG_PORT PG_OWNER=pre-existing
    log "postgres: reusing pre-existing $HOST:$PG_PORT (user postgres)"
    return 0
  else
    PG_PORT=$OWN_PG_PORT PG_OWNER=ours
    if port_open "$PG_PORT"; then
      die "postgres: port $PG_PORT is taken by something we did not start (set CHATIFY_OWN_POSTGRES_PORT)"
    fi
    local bin
    bin=$(pg_bin_dir) || true
    if [[ -z $bin ]]; then
      apt_install postgresql
      bin=$(pg_bin_dir) || die "postgres: installed postgresql but found no initdb under /usr/lib/postgresql"
    fi
    id postgres >/dev/null 2>&1 || as_root useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
    mkdir -p "$LOGS" "$PIDS" "$(dirname "$PG_DATA")" "$(dirname "$PG_LOG")"
    if [[ $PG_DATA != "$LOCAL/"* ]]; then
      log "postgres: data dir outside the checkout (user 'postgres' cannot reach $LOCAL or CHATIFY_PG_DATA set)"
      if [[ $EUID -eq 0 ]]; then chown postgres: "$(dirname "$PG_DATA")"; fi
    fi
    # postgres writes its own log, so the log file must belong to it.
    touch "$PG_LOG"
    if [[ $EUID -eq 0 ]]; then chown postgres: "$PG_LOG"; fi
    if [[ ! -s $PG_DATA/PG_VERSION ]]; then
      log "postgres: initdb $PG_DATA"
      mkdir -p "$PG_DATA"
      if [[ $EUID -eq 0 ]]; then chown postgres: "$PG_DATA"; fi
      chmod 700 "$PG_DATA"
      as_pg "$bin/initdb" -D "$PG_DATA" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >>"$PG_LOG" 2>&1 ||
        fail_with_log postgres "$PG_LOG" "initdb failed"
      # TCP on loopback only; no unix socket, so we never collide with the
      # system cluster's /var/run/postgresql or depend on that dir existing.
      printf "\n# chatify services.sh\nlisten_addresses = '%s'\nunix_socket_directories = ''\n" "$HOST" \
        >>"$PG_DATA/postgresql.conf"
    fi
    # A crash can leave a stale postmaster.pid; postgres itself detects that.
    log "postgres: starting ours on $HOST:$PG_PORT (data $PG_DATA)"
    # Lock fds closed so the postmaster does not inherit our flock (see spawn).
    as_pg "$bin/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -o "-p $PG_PORT" -w -t "$WAIT_SECONDS" start >/dev/null 8>&- 9>&- ||
      fail_with_log postgres "$PG_LOG" "pg_ctl start failed"
    # The postmaster PID is line 1 of postmaster.pid.
    head -n1 "$PG_DATA/postmaster.pid" >"$(pid_file postgres)"
    record_port postgres "$PG_PORT"
  fi
  wait_until postgres "$PG_LOG" "$WAIT_SECONDS" postgres "postgres -D" pg_ready "$PG_PORT"
}

# ------------------------------------------------------------------ tansu ---

tansu_bin() {
  local b
  for b in "$(command -v tansu 2>/dev/null || true)" "$HOME/.cargo/bin/tansu"; do
    [[ -n $b && -x $b ]] && { printf '%s' "$b"; return 0; }
  done
  return 1
}

# Every tansu CLI call runs from the tansu dir: the binary loads ./.env, and
# env vars like ADVERTISED_LISTENER_URL would silently redirect `tansu cat`.
tansu_cli() {
  (cd "$TANSU_DIR" && env -u ADVERTISED_LISTENER_URL -u SCHEMA_REGISTRY RUST_LOG=warn "$TANSU" "$@")
}

# Reads /proc directly: minimal Debian images have no pgrep (procps).
cargo_install_tansu_running() {
  local f
  for f in /proc/[0-9]*/cmdline; do
    tr '\0' ' ' <"$f" 2>/dev/null | grep -q '^[^ ]*cargo install tansu' && return 0
  done
  return 1
}

ensure_tansu_installed() {
  if TANSU=$(tansu_bin); then return 0; fi
  # Another `cargo install tansu` (e.g. from a second clone) is already
  # building it: wait for that instead of starting a competing build.
  if cargo_install_tansu_running; then
    log "tansu: a 'cargo install tansu' is already running; waiting for it (up to 40 min)"
    local deadline=$((SECONDS + 2400))
    until TANSU=$(tansu_bin); do
      if ! cargo_install_tansu_running; then
        TANSU=$(tansu_bin) && break
        die "tansu: the running cargo install finished without producing tansu"
      fi
      ((SECONDS < deadline)) || die "tansu: gave up waiting for the running cargo install"
      sleep 10
    done
    return 0
  fi
  command -v cargo >/dev/null 2>&1 || [[ -x $HOME/.cargo/bin/cargo ]] ||
    die "tansu: cargo not found; install a Rust toolchain (rustup) first"
  local cargo
  cargo=$(command -v cargo 2>/dev/null || echo "$HOME/.cargo/bin/cargo")
  command -v cc >/dev/null 2>&1 || apt_install build-essential pkg-config
  log "tansu: not installed; running cargo install tansu $TANSU_VERSION --features $TANSU_FEATURES"
  log "tansu: NOTE this compiles from source and takes ~18 minutes on 2 cores"
  # Its own temporary target dir: a CARGO_TARGET_DIR shared with the workspace build (as
  # .ci/run sets) would hold that dir's lock for the whole compile and stall every build.
  env -u CARGO_TARGET_DIR "$cargo" install tansu --version "$TANSU_VERSION" --locked --features "$TANSU_FEATURES" ||
    die "tansu: cargo install failed"
  TANSU=$(tansu_bin) || die "tansu: installed but binary not found on PATH or in ~/.cargo/bin"
}

tansu_ready() { port_open "$KAFKA_PORT" && tansu_cli topic list --broker "$TANSU_BROKER_URL"; }

ensure_tansu() {
  ensure_tansu_installed
  mkdir -p "$TANSU_DIR" "$PIDS"
  if our_pid tansu "tansu broker" >/dev/null; then
    KAFKA_OWNER=ours
    log "tansu: reusing ours on $HOST:$KAFKA_PORT"
  elif port_open "$KAFKA_PORT"; then
    # Another checkout on this machine (e.g. CI's fresh clone next to a dev
    # tree) already runs a broker here: share it, like Redis/Postgres.
    tansu_ready >/dev/null 2>&1 ||
      die "tansu: port $KAFKA_PORT is taken by something that is not a working Kafka broker (set CHATIFY_KAFKA_PORT)"
    KAFKA_OWNER=pre-existing
    log "tansu: reusing the pre-existing broker on $HOST:$KAFKA_PORT (not ours: down leaves it alone)"
    return 0
  else
    KAFKA_OWNER=ours
    log "tansu: starting broker on $HOST:$KAFKA_PORT (data $TANSU_DIR/tansu.db)"
    # SQLite engine: durable across restarts (memory:// is not). The sqlite
    # path is relative to the cwd, hence the dedicated dir. RUST_LOG=warn
    # because at info tansu logs hundreds of MB.
    spawn tansu "$TANSU_DIR" "$TANSU_LOG" \
      env -u ADVERTISED_LISTENER_URL -u SCHEMA_REGISTRY -u OTEL_EXPORTER_OTLP_ENDPOINT RUST_LOG=warn \
      "$TANSU" broker \
      --cluster-id chatify \
      --listener-url "$TANSU_BROKER_URL" \
      --advertised-listener-url "$TANSU_BROKER_URL" \
      --storage-engine "sqlite://tansu.db"
    record_port tansu "$KAFKA_PORT"
  fi
  wait_until tansu "$TANSU_LOG" "$TANSU_WAIT_SECONDS" tansu "tansu broker" tansu_ready
}

# Prints "name partitions" for each topic the broker has.
tansu_topics() {
  tansu_cli topic list --broker "$TANSU_BROKER_URL" | "$VENV/bin/python" -c '
import json, sys
for t in json.load(sys.stdin):
    print(t.get("name"), len(t.get("partitions") or []))'
}

ensure_topics() {
  local existing spec suffix parts name have
  existing=$(tansu_topics) || fail_with_log tansu "$TANSU_LOG" "cannot list topics"
  for spec in "${TOPIC_SPECS[@]}"; do
    suffix=${spec%:*} parts=${spec##*:}
    name="$TOPIC_PREFIX.$suffix"
    have=$(awk -v n="$name" '$1 == n { print $2 }' <<<"$existing")
    if [[ -n $have ]]; then
      [[ $have == "$parts" ]] || log "tansu: WARNING topic $name has $have partitions, expected $parts (left as is)"
      continue
    fi
    log "tansu: creating topic $name ($parts partitions)"
    if ! tansu_cli topic create --broker "$TANSU_BROKER_URL" --partitions "$parts" "$name" >>"$TANSU_LOG" 2>&1; then
      # Lost a race with another creator? Then the topic is there now.
      tansu_topics 2>/dev/null | awk -v n="$name" '$1 == n { f = 1 } END { exit !f }' ||
        fail_with_log tansu "$TANSU_LOG" "creating topic $name failed"
    fi
  done
}

# -------------------------------------------------------- mongo/secantus ---

ensure_venv() {
  mkdir -p "$CACHE_DIR"
  # Several clones may share the cache: serialise venv creation/installs.
  exec 9>"$CACHE_DIR/venv.lock"
  flock 9
  # A venv breaks if the python it was made from went away: rebuild it then.
  if [[ -x $VENV/bin/python ]] && ! "$VENV/bin/python" -c 'pass' >/dev/null 2>&1; then
    log "mongo: venv $VENV is broken; recreating"
    rm -rf "$VENV"
  fi
  if [[ ! -x $VENV/bin/python ]]; then
    command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
    log "mongo: creating venv $VENV"
    if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
      rm -rf "$VENV"
      apt_install python3-venv
      python3 -m venv "$VENV" || die "mongo: python3 -m venv failed"
    fi
  fi
  if [[ ! -x $VENV/bin/secantusd-py ]]; then
    log "mongo: pip install SecantusDB into $VENV"
    "$VENV/bin/pip" install -q SecantusDB || die "mongo: pip install SecantusDB failed"
  fi
  if ! "$VENV/bin/python" -c 'import pymongo' >/dev/null 2>&1; then
    log "mongo: pip install pymongo into $VENV (readiness check)"
    "$VENV/bin/pip" install -q pymongo || die "mongo: pip install pymongo failed"
  fi
  flock -u 9
  exec 9>&-
}

mongo_ping() { # a real MongoDB `ping` through pymongo
  "$VENV/bin/python" - "$HOST" "$MONGO_PORT" <<'PY'
import sys, pymongo
c = pymongo.MongoClient(host=sys.argv[1], port=int(sys.argv[2]),
                        serverSelectionTimeoutMS=1500, connectTimeoutMS=1500)
c.admin.command("ping")
PY
}

ensure_mongo() {
  ensure_venv
  if our_pid mongo secantusd-py >/dev/null; then
    MONGO_OWNER=ours
    log "mongo: reusing ours (SecantusDB) on $HOST:$MONGO_PORT"
  elif port_open "$MONGO_PORT"; then
    # As for tansu: share a MongoDB another checkout already runs here.
    mongo_ping >/dev/null 2>&1 ||
      die "mongo: port $MONGO_PORT is taken by something that does not answer MongoDB ping (set CHATIFY_MONGO_PORT)"
    MONGO_OWNER=pre-existing
    log "mongo: reusing the pre-existing MongoDB on $HOST:$MONGO_PORT (not ours: down leaves it alone)"
    return 0
  else
    MONGO_OWNER=ours
    mkdir -p "$MONGO_DIR" "$LOGS"
    log "mongo: starting SecantusDB on $HOST:$MONGO_PORT (data $MONGO_DIR)"
    # cwd .local: secantusd-py auto-discovers ./secantusd.toml, keep it clean.
    spawn mongo "$LOCAL" "$MONGO_LOG" "$VENV/bin/secantusd-py" \
      --host "$HOST" --port "$MONGO_PORT" --storage-path "$MONGO_DIR"
    record_port mongo "$MONGO_PORT"
  fi
  wait_until mongo "$MONGO_LOG" "$WAIT_SECONDS" mongo secantusd-py mongo_ping
}

# ------------------------------------------------------------ env/migrate ---

write_env_file() {
  local tmp="$ENV_FILE.tmp"
  cat >"$tmp" <<EOF
KAFKA_BOOTSTRAP_SERVERS=$HOST:$KAFKA_PORT
REDIS_URL=redis://$HOST:$REDIS_PORT
POSTGRES_URL=postgres://postgres@$HOST:$PG_PORT/chatify
MONGO_URL=mongodb://$HOST:$MONGO_PORT
CHATIFY_TOPIC_PREFIX=$TOPIC_PREFIX
EOF
  mv "$tmp" "$ENV_FILE"
}

# Export the env file's KEY=VALUE lines into the current (sub)shell.
export_env_file() {
  local key value
  while IFS='=' read -r key value; do
    if [[ -n $key && $key != \#* ]]; then export "$key=$value"; fi
  done <"$ENV_FILE"
}

run_migrations() {
  if [[ ${CHATIFY_SKIP_MIGRATE:-0} == 1 ]]; then
    log "migrations: skipped (CHATIFY_SKIP_MIGRATE=1)"
    return 0
  fi
  log "migrations: cargo run -q --locked -p chatify-migrations --bin chatify-migrate"
  (
    export_env_file
    cd "$REPO"
    cargo run -q --locked -p chatify-migrations --bin chatify-migrate
  ) || die "migrations: chatify-migrate failed (set CHATIFY_SKIP_MIGRATE=1 to skip)"
}

# --------------------------------------------------------------- commands ---

topic_summary() { # "chatify.upstream(8) chatify.upstream.dlq(2) ..."
  local spec out=""
  for spec in "${TOPIC_SPECS[@]}"; do out+="$TOPIC_PREFIX.${spec%:*}(${spec##*:}) "; done
  printf '%s' "${out% }"
}

# One `up`/`down` at a time per checkout (fd 8; spawn keeps it from daemons).
take_lock() {
  exec 8>"$LOCAL/.lock"
  if ! flock -n 8; then
    log "another up/down is running in this checkout; waiting for it"
    flock 8
  fi
}

summary_row() { printf '  %-17s %-16s %-13s %s\n' "$@"; }

cmd_up() {
  mkdir -p "$LOCAL" "$PIDS" "$LOGS"
  ensure_gitignore
  take_lock
  load_recorded_ports
  ensure_redis
  ensure_postgres
  ensure_mongo
  ensure_tansu
  ensure_topics
  write_env_file
  run_migrations
  local redis_extra="" pg_extra=""
  if [[ $REDIS_OWNER == ours ]]; then redis_extra="data $REDIS_DIR  log $REDIS_LOG"; fi
  if [[ $PG_OWNER == ours ]]; then pg_extra="data $PG_DATA  log $PG_LOG"; fi
  echo
  echo "Chatify services are up:"
  local kafka_extra="" mongo_extra=""
  if [[ $KAFKA_OWNER == ours ]]; then kafka_extra="data $TANSU_DIR/tansu.db  log $TANSU_LOG"; fi
  if [[ $MONGO_OWNER == ours ]]; then mongo_extra="data $MONGO_DIR  log $MONGO_LOG"; fi
  summary_row "kafka (tansu)" "$HOST:$KAFKA_PORT" "$KAFKA_OWNER" "$kafka_extra"
  summary_row "mongo (secantus)" "$HOST:$MONGO_PORT" "$MONGO_OWNER" "$mongo_extra"
  summary_row redis "$HOST:$REDIS_PORT" "$REDIS_OWNER" "$redis_extra"
  summary_row postgres "$HOST:$PG_PORT" "$PG_OWNER" "$pg_extra"
  printf '  %-17s %s\n' topics "$(topic_summary)"
  echo
  echo "Env file: $ENV_FILE"
  sed 's/^/  /' "$ENV_FILE"
}

cmd_down() {
  mkdir -p "$LOCAL"
  take_lock
  # Only PID files we wrote; pre-existing Postgres/Redis have none.
  stop_ours tansu "tansu broker" TERM 30
  stop_ours mongo secantusd-py TERM 30
  stop_ours redis redis-server TERM 30
  # SIGINT = postgres "fast" shutdown: doesn't wait for clients to leave.
  stop_ours postgres "postgres -D" INT 60
  log "down: stopped everything this checkout started (pre-existing services untouched)"
}

status_line() { printf "  %-10s %-8s %-13s %s\n" "$@"; }

cmd_status() {
  local pid
  load_recorded_ports
  echo "Chatify services ($REPO):"
  if pid=$(our_pid tansu "tansu broker"); then
    status_line kafka "$(port_open "$KAFKA_PORT" && echo up || echo down)" "ours" "$HOST:$KAFKA_PORT (pid $pid)"
  elif port_open "$KAFKA_PORT"; then status_line kafka up pre-existing "$HOST:$KAFKA_PORT"
  else status_line kafka down "-" "$HOST:$KAFKA_PORT"
  fi
  if pid=$(our_pid mongo secantusd-py); then
    status_line mongo "$(port_open "$MONGO_PORT" && echo up || echo down)" "ours" "$HOST:$MONGO_PORT (pid $pid)"
  elif port_open "$MONGO_PORT"; then status_line mongo up pre-existing "$HOST:$MONGO_PORT"
  else status_line mongo down "-" "$HOST:$MONGO_PORT"
  fi
  if pid=$(our_pid redis redis-server); then
    status_line redis "$(redis_ping "$OWN_REDIS_PORT" && echo up || echo down)" "ours" "$HOST:$OWN_REDIS_PORT (pid $pid)"
  elif redis_ping "$SHARED_REDIS_PORT"; then status_line redis up "pre-existing" "$HOST:$SHARED_REDIS_PORT"
  else status_line redis down "-" "$HOST:$SHARED_REDIS_PORT"
  fi
  if pid=$(our_pid postgres "postgres -D"); then
    status_line postgres "$(pg_ready "$OWN_PG_PORT" && echo up || echo down)" "ours" "$HOST:$OWN_PG_PORT (pid $pid)"
  elif pg_ready "$SHARED_PG_PORT"; then status_line postgres up "pre-existing" "$HOST:$SHARED_PG_PORT"
  else status_line postgres down "-" "$HOST:$SHARED_PG_PORT"
  fi
  if port_open "$KAFKA_PORT" && TANSU=$(tansu_bin); then
    local existing spec name missing=()
    if existing=$(tansu_topics 2>/dev/null); then
      for spec in "${TOPIC_SPECS[@]}"; do
        name="$TOPIC_PREFIX.${spec%:*}"
        awk -v n="$name" '$1 == n { f = 1 } END { exit !f }' <<<"$existing" || missing+=("$name")
      done
      if ((${#missing[@]} == 0)); then
        status_line topics ok "" "all ${#TOPIC_SPECS[@]} $TOPIC_PREFIX.* topics present"
      else
        status_line topics MISSING "" "${missing[*]} (run up to recreate)"
      fi
    fi
  fi
  if [[ -f $ENV_FILE ]]; then echo "Env file: $ENV_FILE"; else echo "Env file: (not written yet; run up)"; fi
}

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}

main() {
  case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) echo "$ENV_FILE" ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
  esac
}

# Sourcing (for tests) defines the functions without running anything.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then main "$@"; fi
