#!/usr/bin/env bash
# run_pipeline.sh — runs the whole CDC pipeline in the background on one machine.
#
#   ./run_pipeline.sh start|status|stop [--keep-db]|restart|loader|help
#   ./run_pipeline.sh db-up|db-down|db-status          (the databases only)
#
# Databases: `docker compose` (docker-compose.yml) when a Docker engine answers, otherwise two
# local clusters via scripts/local-db.sh (initdb/pg_ctl under .local/pg); databases on another
# host are only waited for, never started or stopped. The backend chosen by `start` is kept in
# run/db.mode so that `stop` and `status` act on the same one.
#
# Processes: mutator, extractor and scd2-loader, started from the project root (each reads
# .env there), detached, with a PID file in run/<binary>.pid. Each writes its own log
# (LOG_OUTPUT=file): rotating files in $LOG_DIR, $LOG_DIR/<binary>.log (or <binary>.json.log)
# linking to the current one; what a program prints outside its log (a crash, a bad
# setting) is appended to $LOG_DIR/<binary>.stderr. `start` returns once the databases
# answer, every process is alive, and extractor and loader answer 200 on /readyz (with curl;
# the mutator, or a program whose endpoint is off, or no curl: once it has logged that it
# started); `stop` sends SIGTERM (the binaries finish or roll back the current batch and exit
# 0), waits, then SIGKILLs whatever is left.
#
# Settings (environment first, then .env): the binaries' own (DB_*, WAREHOUSE_DB_*, ...), and
#   LOG_DIR        where the logs go                               (logs)
#   LOG_ROTATION, LOG_MAX_FILES  read by the programs (daily, 14)
#   CDC_BIN_DIR    take the binaries from here instead of building (cargo build --release)
#   DB_BACKEND     auto | docker | local | external                (auto)
#   START_TIMEOUT  seconds `start` waits for everything to be healthy (60)
#   STOP_TIMEOUT   seconds `stop` waits for a process after SIGTERM    (30)
#   EXTRACTOR_METRICS_ADDR, LOADER_METRICS_ADDR  where `start` and `status` ask /readyz
#                  (127.0.0.1:9187, 127.0.0.1:9188; off: the log line instead)
# Uses no network but loopback (and whatever hosts DB_HOST/WAREHOUSE_DB_HOST name).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

PROCS=(mutator extractor scd2-loader)
RUN_DIR="$ROOT/run"
MODE_FILE="$RUN_DIR/db.mode"

# ---------------------------------------------------------------------------------------------
# Settings: the environment wins over .env (as with dotenvy in the binaries). Only the
# settings this script needs are read, and none is exported: the binaries read .env themselves.
# ---------------------------------------------------------------------------------------------
OWN_SETTINGS=(DB_HOST DB_PORT DB_NAME DB_USER DB_PASSWORD WAREHOUSE_DB_HOST WAREHOUSE_DB_PORT
  WAREHOUSE_DB_NAME WAREHOUSE_DB_USER WAREHOUSE_DB_PASSWORD LOG_DIR CDC_BIN_DIR LOCAL_DB_DIR
  DB_BACKEND START_TIMEOUT STOP_TIMEOUT EXTRACTOR_METRICS_ADDR LOADER_METRICS_ADDR LOG_FORMAT)

# shellcheck source=scripts/dotenv.sh
source "$(dirname "${BASH_SOURCE[0]}")/scripts/dotenv.sh"
load_dotenv "${OWN_SETTINGS[@]}"

SRC_HOST="${DB_HOST:-localhost}"
SRC_PORT="${DB_PORT:-5434}"
SRC_DB="${DB_NAME:-operational_db}"
SRC_USER="${DB_USER:-postgres}"
SRC_PASSWORD="${DB_PASSWORD:-postgres}"
WH_HOST="${WAREHOUSE_DB_HOST:-localhost}"
WH_PORT="${WAREHOUSE_DB_PORT:-5433}"
WH_DB="${WAREHOUSE_DB_NAME:-warehouse_db}"
WH_USER="${WAREHOUSE_DB_USER:-postgres}"
WH_PASSWORD="${WAREHOUSE_DB_PASSWORD:-postgres}"
LOG_DIR="${LOG_DIR:-logs}"
[[ "$LOG_DIR" = /* ]] || LOG_DIR="$ROOT/$LOG_DIR"
# Text and JSON logs go to files of their own (<binary>.text.<date>.log, linked from
# <binary>.log; <binary>.json.<date>.log, linked from <binary>.json.log): one file never
# mixes the two.
LOG_FMT="${LOG_FORMAT:-text}"
LOCAL_DB_DIR="${LOCAL_DB_DIR:-.local/pg}"
[[ "$LOCAL_DB_DIR" = /* ]] || LOCAL_DB_DIR="$ROOT/$LOCAL_DB_DIR"
START_TIMEOUT="${START_TIMEOUT:-60}"
EXTRACTOR_METRICS_ADDR="${EXTRACTOR_METRICS_ADDR:-127.0.0.1:9187}"
LOADER_METRICS_ADDR="${LOADER_METRICS_ADDR:-127.0.0.1:9188}"
STOP_TIMEOUT="${STOP_TIMEOUT:-30}"
if [[ -n "${CDC_BIN_DIR:-}" ]]; then
  BIN_DIR="$CDC_BIN_DIR"
  [[ "$BIN_DIR" = /* ]] || BIN_DIR="$ROOT/$BIN_DIR"
else
  # cargo's own target directory, wherever CARGO_TARGET_DIR puts it.
  target_dir="${CARGO_TARGET_DIR:-$ROOT/target}"
  [[ "$target_dir" = /* ]] || target_dir="$ROOT/$target_dir"
  BIN_DIR="$target_dir/release"
fi

say()  { echo "pipeline: $*"; }
warn() { echo "pipeline: warning: $*" >&2; }
die()  { echo "pipeline: error: $*" >&2; exit 1; }

# Runs "$@" for at most $1 seconds (the `timeout` utility when there is one).
with_timeout() {
  local secs="$1"; shift
  if command -v timeout >/dev/null 2>&1; then
    timeout "$secs" "$@"
    return
  fi
  "$@" & local pid=$!
  ( sleep "$secs"; kill -9 "$pid" 2>/dev/null ) >/dev/null 2>&1 & local killer=$!
  local rc=0
  wait "$pid" || rc=$?
  kill "$killer" 2>/dev/null || true
  wait "$killer" 2>/dev/null || true
  return "$rc"
}

is_loopback() {
  case "$1" in localhost|127.*|::1|"") return 0 ;; *) return 1 ;; esac
}

# ---------------------------------------------------------------------------------------------
# Databases
# ---------------------------------------------------------------------------------------------

# The compose command, or nothing when there is no usable Docker engine (answering within 5 s).
compose_cmd() {
  command -v docker >/dev/null 2>&1 || return 1
  with_timeout 5 docker info >/dev/null 2>&1 || return 1
  if docker compose version >/dev/null 2>&1; then
    echo "docker compose"
  elif command -v docker-compose >/dev/null 2>&1; then
    echo "docker-compose"
  else
    return 1
  fi
}

compose() {
  local cmd
  cmd="$(compose_cmd)" || die "no Docker engine with 'docker compose' answers"
  # shellcheck disable=SC2086  # "docker compose" is two words on purpose
  $cmd -f "$ROOT/docker-compose.yml" "$@"
}

local_clusters_exist() {
  [[ -f "$LOCAL_DB_DIR/source/PG_VERSION" || -f "$LOCAL_DB_DIR/warehouse/PG_VERSION" ]]
}

# Which backend provides the databases: docker, local or external.
db_mode() {
  if [[ -n "${DB_BACKEND:-}" && "$DB_BACKEND" != auto ]]; then
    case "$DB_BACKEND" in
      docker|local|external) echo "$DB_BACKEND"; return ;;
      *) die "DB_BACKEND must be auto, docker, local or external (got '$DB_BACKEND')" ;;
    esac
  fi
  if [[ -s "$MODE_FILE" ]]; then cat "$MODE_FILE"; return; fi
  if ! is_loopback "$SRC_HOST" || ! is_loopback "$WH_HOST"; then echo external; return; fi
  # Existing local clusters keep their data: prefer them over a Docker engine.
  if local_clusters_exist; then echo local; return; fi
  if compose_cmd >/dev/null; then echo docker; else echo local; fi
}

# Does the database answer (and accept our login, when psql is there to try it)?
db_answers() {
  local host="$1" port="$2" db="$3" user="$4" password="$5"
  if command -v psql >/dev/null 2>&1; then
    PGPASSWORD="$password" PGCONNECT_TIMEOUT=3 with_timeout 5 \
      psql -X -q -w -h "$host" -p "$port" -U "$user" -d "$db" -tAc 'SELECT 1' >/dev/null 2>&1
  elif command -v pg_isready >/dev/null 2>&1; then
    with_timeout 5 pg_isready -q -h "$host" -p "$port" -d "$db" -U "$user" >/dev/null 2>&1
  else
    [[ "$host" == localhost ]] && host=127.0.0.1
    with_timeout 3 bash -c "exec 3<>/dev/tcp/$host/$port" >/dev/null 2>&1
  fi
}
source_answers()    { db_answers "$SRC_HOST" "$SRC_PORT" "$SRC_DB" "$SRC_USER" "$SRC_PASSWORD"; }
warehouse_answers() { db_answers "$WH_HOST" "$WH_PORT" "$WH_DB" "$WH_USER" "$WH_PASSWORD"; }

wait_for_databases() {
  local deadline=$((SECONDS + START_TIMEOUT))
  until source_answers && warehouse_answers; do
    if ((SECONDS >= deadline)); then
      source_answers || echo "  source    $SRC_HOST:$SRC_PORT/$SRC_DB does not answer" >&2
      warehouse_answers || echo "  warehouse $WH_HOST:$WH_PORT/$WH_DB does not answer" >&2
      die "databases not ready after ${START_TIMEOUT}s"
    fi
    sleep 1
  done
}

db_up() {
  local mode
  mode="$(db_mode)"
  mkdir -p "$RUN_DIR"
  case "$mode" in
    docker)
      say "starting databases with docker compose"
      compose up -d operational-db warehouse-db
      ;;
    local)
      say "starting local PostgreSQL clusters (scripts/local-db.sh)"
      if ! scripts/local-db.sh start; then
        # Not ours to start (e.g. another server already on those ports): use it if it answers.
        if source_answers && warehouse_answers; then
          warn "local clusters could not be started, but databases answer on $SRC_PORT/$WH_PORT: using those"
          mode=external
        else
          die "scripts/local-db.sh start failed"
        fi
      fi
      ;;
    external)
      say "databases are managed elsewhere ($SRC_HOST:$SRC_PORT, $WH_HOST:$WH_PORT): waiting for them"
      ;;
  esac
  echo "$mode" > "$MODE_FILE"
  wait_for_databases
  say "databases up ($mode): source $SRC_HOST:$SRC_PORT/$SRC_DB, warehouse $WH_HOST:$WH_PORT/$WH_DB"
}

db_down() {
  local mode
  mode="$(db_mode)"
  case "$mode" in
    docker)
      if compose_cmd >/dev/null; then
        say "stopping docker compose databases"
        compose stop
      else
        warn "Docker engine not answering; compose databases not stopped"
      fi
      ;;
    local)
      if local_clusters_exist; then
        scripts/local-db.sh stop
      fi
      ;;
    external)
      say "databases are not managed by this script; left running"
      ;;
  esac
  rm -f "$MODE_FILE"
}

# Prints one line per database; returns non-zero when one is down.
db_status() {
  local rc=0 mode
  mode="$(db_mode)"
  if source_answers; then
    printf '  %-12s up    %s:%s/%s (%s)\n' source "$SRC_HOST" "$SRC_PORT" "$SRC_DB" "$mode"
  else
    printf '  %-12s DOWN  %s:%s/%s (%s)\n' source "$SRC_HOST" "$SRC_PORT" "$SRC_DB" "$mode"; rc=1
  fi
  if warehouse_answers; then
    printf '  %-12s up    %s:%s/%s (%s)\n' warehouse "$WH_HOST" "$WH_PORT" "$WH_DB" "$mode"
  else
    printf '  %-12s DOWN  %s:%s/%s (%s)\n' warehouse "$WH_HOST" "$WH_PORT" "$WH_DB" "$mode"; rc=1
  fi
  return "$rc"
}

# ---------------------------------------------------------------------------------------------
# Binaries
# ---------------------------------------------------------------------------------------------
ensure_binaries() {
  if [[ -z "${CDC_BIN_DIR:-}" ]]; then
    if command -v cargo >/dev/null 2>&1; then
      say "building release binaries (cargo build --release --bins)"
      cargo build --release --bins || die "cargo build failed"
    else
      warn "cargo not found; using the binaries already in $BIN_DIR"
    fi
  fi
  local p
  for p in "${PROCS[@]}"; do
    [[ -x "$BIN_DIR/$p" ]] || die "$BIN_DIR/$p not found (install Rust from https://rustup.rs and run 'make build', or set CDC_BIN_DIR)"
  done
}

# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------
pid_file() { echo "$RUN_DIR/$1.pid"; }
# The link to $1's current log file (made by the program itself).
log_file() {
  if [[ "$LOG_FMT" == json ]]; then echo "$LOG_DIR/$1.json.log"; else echo "$LOG_DIR/$1.log"; fi
}
stderr_file() { echo "$LOG_DIR/$1.stderr"; }
# Where $1's log is now: "<file>:<size>" of the file its link points at (":0" when none), so
# that what a new start writes can be told from what was there.
log_mark() {
  local f
  f="$(readlink -f "$(log_file "$1")" 2>/dev/null || true)"
  if [[ -n "$f" && -f "$f" ]]; then echo "$f:$(wc -c < "$f" | tr -d ' ')"; else echo ":0"; fi
}
# What $1 logged since mark $2 (from log_mark): the rest of that file, or all of the current
# one when the link now points elsewhere (a new file, a rotation).
log_since() {
  local mark="$2" f
  f="$(readlink -f "$(log_file "$1")" 2>/dev/null || true)"
  [[ -n "$f" && -f "$f" ]] || return 0
  if [[ "$f" == "${mark%:*}" ]]; then
    tail -c "+$(( ${mark##*:} + 1 ))" "$f" 2>/dev/null || true
  else
    cat "$f" 2>/dev/null || true
  fi
}
format_file() { echo "$RUN_DIR/$1.log-format"; }
# A path as shown to the user: relative to the project root when inside it.
show() { echo "${1#"$ROOT"/}"; }

# The line each binary logs once it is connected and working.
started_line() {
  case "$1" in
    mutator) echo "mutator started" ;;
    extractor) echo "extractor started" ;;
    scd2-loader) echo "loader started" ;;
  esac
}

# The base URL of $1's endpoints (http://host:port), or non-zero status when it has none
# (the mutator, an endpoint that is off) or there is no curl to ask it with.
endpoint_url() {
  local addr host port
  case "$1" in
    extractor) addr="$EXTRACTOR_METRICS_ADDR" ;;
    scd2-loader) addr="$LOADER_METRICS_ADDR" ;;
    *) return 1 ;;
  esac
  addr="${addr//[[:space:]]/}"
  [[ "${addr,,}" != off && "$addr" == *:* ]] || return 1
  command -v curl >/dev/null 2>&1 || return 1
  host="${addr%:*}" port="${addr##*:}"
  # A wildcard address is asked on the loopback.
  case "$host" in
    0.0.0.0|"") host=127.0.0.1 ;;
    "[::]") host="[::1]" ;;
  esac
  echo "http://$host:$port"
}

# $1's answer on /readyz: the body ("ready", or "not ready: <reason>") on stdout; exit 0 when
# ready, 1 when not (or no answer), 2 when there is no endpoint to ask.
readyz() {
  local url out
  url="$(endpoint_url "$1")" || return 2
  if ! out="$(curl -sS --max-time 3 -w '\n%{http_code}' "$url/readyz" 2>/dev/null)"; then
    echo "not ready: $url/readyz does not answer"
    return 1
  fi
  echo "${out%$'\n'*}"
  [[ "${out##*$'\n'}" == 200 ]]
}

# Is $2 a live (not zombie) process running binary $1? Guards against a recycled PID.
pid_alive() {
  local name="$1" pid="$2" state cmdline
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  # kill -0 fails for another user's process too: then ask /proc or ps whether it exists.
  kill -0 "$pid" 2>/dev/null || [[ -d "/proc/$pid" ]] || ps -p "$pid" >/dev/null 2>&1 || return 1
  if [[ -r "/proc/$pid/stat" ]]; then
    state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)"
    cmdline="$( { tr '\0' ' ' < "/proc/$pid/cmdline"; } 2>/dev/null || true)"
  else
    state="$(ps -o stat= -p "$pid" 2>/dev/null || true)"
    cmdline="$(ps -o args= -p "$pid" 2>/dev/null || true)"
  fi
  [[ "$state" != Z* ]] || return 1
  [[ "$cmdline" == *"$name"* ]]
}

# The PID of the running copy of $1, or non-zero status. Removes a stale PID file.
running_pid() {
  local name="$1" f pid
  f="$(pid_file "$name")"
  [[ -f "$f" ]] || return 1
  pid="$(cat "$f" 2>/dev/null || true)"
  if pid_alive "$name" "$pid"; then
    echo "$pid"
    return 0
  fi
  rm -f "$f"
  return 1
}

launch() {
  local name="$1" err
  err="$(stderr_file "$name")"
  # The program writes and rotates its own log; its stderr keeps what is said outside it.
  # A session of its own: no terminal signals (Ctrl-C, hang-up) reach it; only `stop` does.
  if command -v setsid >/dev/null 2>&1; then
    LOG_OUTPUT=file LOG_DIR="$LOG_DIR" setsid "$BIN_DIR/$name" >>"$err" 2>&1 </dev/null &
  else
    LOG_OUTPUT=file LOG_DIR="$LOG_DIR" nohup "$BIN_DIR/$name" >>"$err" 2>&1 </dev/null &
  fi
  echo $! > "$(pid_file "$name")"
  echo "$LOG_FMT" > "$(format_file "$name")"
}

# SIGTERM, wait up to STOP_TIMEOUT seconds, then SIGKILL.
stop_process() {
  local name="$1" pid deadline
  if ! pid="$(running_pid "$name")"; then
    say "$name not running"
    rm -f "$(pid_file "$name")"
    return 0
  fi
  if ! kill -TERM "$pid" 2>/dev/null; then
    warn "cannot signal $name (pid $pid): started by another user?"
    return 1
  fi
  deadline=$((SECONDS + STOP_TIMEOUT))
  while pid_alive "$name" "$pid"; do
    if ((SECONDS >= deadline)); then
      warn "$name (pid $pid) still running after ${STOP_TIMEOUT}s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
      break
    fi
    sleep 0.2
  done
  if pid_alive "$name" "$pid"; then
    warn "$name (pid $pid) did not exit"
    return 1
  fi
  rm -f "$(pid_file "$name")" "$(format_file "$name")"
  say "$name stopped (pid $pid)"
}

# The last lines $1 logged since mark $2 (this start; from log_mark) or, without one, the
# last lines of its current log; then what it printed outside its log since byte $3 of
# <binary>.stderr.
print_log_tail() {
  local mark="${2:-}" err_offset="${3:-0}" out err
  if [[ -z "$mark" || "$mark" == -1 ]]; then mark=":0"; fi
  out="$(log_since "$1" "$mark" | tail -n 30)"
  echo "---- last lines of $(show "$(log_file "$1")") ----" >&2
  if [[ -n "$out" ]]; then echo "$out" >&2; else echo "(nothing logged)" >&2; fi
  err="$(stderr_file "$1")"
  ((err_offset >= 0)) || err_offset=0
  out="$(tail -c "+$((err_offset + 1))" "$err" 2>/dev/null | tail -n 30 || true)"
  if [[ -n "$out" ]]; then
    echo "---- $(show "$err") ----" >&2
    echo "$out" >&2
  fi
  echo "----" >&2
}

# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------
cmd_start() {
  ensure_binaries
  db_up
  mkdir -p "$RUN_DIR" "$LOG_DIR"

  local name pid started=() offsets=() err_offsets=() pids=() i
  for name in "${PROCS[@]}"; do
    if pid="$(running_pid "$name")"; then
      local had
      had="$(cat "$(format_file "$name")" 2>/dev/null || echo text)"
      if [[ "$had" != "$LOG_FMT" ]]; then
        echo "pipeline: error: $name is running (pid $pid) with $had logs; stop it first (make stop) to start it with LOG_FORMAT=$LOG_FMT" >&2
        return 1
      fi
      say "$name already running (pid $pid); not starting a second copy"
      offsets+=("-1")
      err_offsets+=("-1")
      pids+=("$pid")
      continue
    fi
    offsets+=("$(log_mark "$name")")
    : >> "$(stderr_file "$name")"
    err_offsets+=("$(wc -c < "$(stderr_file "$name")" | tr -d ' ')")
    launch "$name"
    started+=("$name")
    pids+=("$(cat "$(pid_file "$name")")")
    say "$name launched (pid $(cat "$(pid_file "$name")"), log $(show "$(log_file "$name")"))"
  done

  # Healthy: databases answer, every process alive, and each one ready: 200 on /readyz, or
  # (no endpoint to ask) a new one has logged its start.
  local deadline=$((SECONDS + START_TIMEOUT)) pending failed="" code
  while :; do
    pending=""
    for i in "${!PROCS[@]}"; do
      name="${PROCS[$i]}"
      if ! pid_alive "$name" "${pids[$i]}"; then
        failed="$i"
        break 2
      fi
      if endpoint_url "$name" >/dev/null; then
        readyz "$name" >/dev/null || pending="${pending:-$i}"
      elif [[ "${offsets[$i]}" != -1 ]] &&
         ! log_since "$name" "${offsets[$i]}" | grep -F -- "$(started_line "$name")" >/dev/null; then
        pending="${pending:-$i}"
      fi
    done
    if [[ -z "$pending" ]] && source_answers && warehouse_answers; then
      break
    fi
    if ((SECONDS >= deadline)); then
      failed="${pending:-db}"
      break
    fi
    sleep 0.5
  done

  if [[ -n "$failed" ]]; then
    if [[ "$failed" == db ]]; then
      db_status >&2 || true
      echo "pipeline: error: the databases stopped answering" >&2
    else
      name="${PROCS[$failed]}"
      if pid_alive "$name" "${pids[$failed]}" && endpoint_url "$name" >/dev/null; then
        echo "pipeline: error: $name was not ready within ${START_TIMEOUT}s ($(endpoint_url "$name")/readyz said: $(ready_word "$name"))" >&2
      elif pid_alive "$name" "${pids[$failed]}"; then
        echo "pipeline: error: $name did not log '$(started_line "$name")' within ${START_TIMEOUT}s" >&2
      else
        code="?"
        if [[ "${offsets[$failed]}" != -1 ]]; then   # our child: its exit status is known
          code=0; wait "${pids[$failed]}" 2>/dev/null || code=$?
        fi
        echo "pipeline: error: $name exited during start-up (exit status $code)" >&2
        rm -f "$(pid_file "$name")"
      fi
      print_log_tail "$name" "${offsets[$failed]}" "${err_offsets[$failed]}"
    fi
    # Do not leave a half-started pipeline behind: stop what this call started.
    if ((${#started[@]} > 0)); then
      for name in "${started[@]}"; do stop_process "$name" >&2 || true; done
    fi
    exit 1
  fi

  echo
  say "pipeline is running"
  db_status || true
  for name in "${PROCS[@]}"; do
    printf '  %-12s pid %-8s log %s\n' "$name" "$(running_pid "$name")" "$(show "$(log_file "$name")")"
  done
  cat <<EOF

  make status   databases, processes and lag      make logs   follow the logs
  make validate check the history invariants      make stop   stop everything
EOF
}

cmd_status() {
  local rc=0 name pid
  echo "databases"
  db_status || rc=1
  echo "processes"
  for name in "${PROCS[@]}"; do
    if pid="$(running_pid "$name")"; then
      printf '  %-12s running  pid %-8s %s\n' "$name" "$pid" "$(ready_word "$name")"
    else
      printf '  %-12s stopped\n' "$name"
      rc=1
    fi
  done
  echo "pipeline"
  if [[ -x "$BIN_DIR/scd2-loader" ]]; then
    # Its verdict counts too: dead letters, lag, a slot holding too much WAL, an outage.
    "$BIN_DIR/scd2-loader" status 2>&1 | sed 's/^/  /'
    [[ "${PIPESTATUS[0]}" -eq 0 ]] || rc=1
  else
    echo "  ($BIN_DIR/scd2-loader not built: make build)"
  fi
  if ((rc == 0)); then echo "status: healthy"; else echo "status: NOT healthy"; fi
  return "$rc"
}

# "ready", "not ready: <reason>", or nothing when there is no endpoint to ask.
ready_word() {
  local said rc=0
  said="$(readyz "$1")" || rc=$?
  ((rc == 2)) || echo "${said%%$'\n'*}"
}

cmd_stop() {
  local keep_db=0 arg i
  for arg in "$@"; do
    case "$arg" in
      --keep-db) keep_db=1 ;;
      *) die "stop: unknown option '$arg' (only --keep-db)" ;;
    esac
  done
  # Producer first, then capture, then apply.
  local rc=0
  for i in "${!PROCS[@]}"; do
    stop_process "${PROCS[$i]}" || rc=1
  done
  if ((rc != 0)); then
    die "some processes are still running; databases left up"
  fi
  if ((keep_db == 0)); then
    db_down
  fi
  rmdir "$RUN_DIR" 2>/dev/null || true
}

cmd_loader() {
  local pid
  if pid="$(running_pid scd2-loader)"; then
    say "scd2-loader is running in the background (pid $pid) and applies files as they arrive; nothing to do"
    return 0
  fi
  ensure_binaries
  say "applying pending change-log files (scd2-loader --once)"
  exec "$BIN_DIR/scd2-loader" --once
}

cmd_help() {
  cat <<'EOF'
Usage: ./run_pipeline.sh <command>

Commands:
  start            start the databases (if needed), build the binaries (if needed) and run
                   mutator, extractor and scd2-loader in the background; returns once all is
                   healthy: extractor and loader answer 200 on /readyz (fails, showing the
                   log, after START_TIMEOUT seconds)
  status           databases up/down, processes running/stopped (and ready or not), and
                   `scd2-loader status` (pending files, lag); exit 0 only when everything is
                   healthy
  stop [--keep-db] stop the processes (SIGTERM, SIGKILL after STOP_TIMEOUT s), then the
                   databases this script manages unless --keep-db; safe to repeat
  restart          stop --keep-db, then start
  loader           run `scd2-loader --once` in the foreground: apply what is pending now
  db-up | db-down | db-status
                   the databases only
  help             this text

Databases: docker compose when a Docker engine answers, otherwise two local PostgreSQL
clusters (scripts/local-db.sh, under .local/pg). PID files: run/<binary>.pid.
Logs: each program writes its own, rotating (LOG_ROTATION daily | hourly, UTC; LOG_MAX_FILES
kept, 14): LOG_DIR/<binary>.text.<date>.log, LOG_DIR/<binary>.log links to the current one
(LOG_FORMAT=json: <binary>.json.<date>.log and <binary>.json.log); what a program prints
outside its log (a crash, a bad setting) goes to LOG_DIR/<binary>.stderr.

Main settings (environment, or .env — see .env.example):
  DB_HOST/DB_PORT/DB_NAME/DB_USER/DB_PASSWORD      source database   (localhost:5434/operational_db)
  WAREHOUSE_DB_HOST/_PORT/_NAME/_USER/_PASSWORD    warehouse         (localhost:5433/warehouse_db)
  MUTATION_INTERVAL_SECONDS, MUTATION_BATCH_SIZE   simulated traffic (2 s, 5 operations)
  CDC_CAPTURE_MODE                                 timestamp | logical (timestamp)
  CDC_EXTRACTION_INTERVAL_SECONDS                  seconds from one capture pass's start to the next (0.2)
  LOADER_POLL_INTERVAL_SECONDS                     safety-net look for files besides the notification (5; 0.5 unwatched)
  LOG_LEVEL, LOG_FORMAT                            info, text | json
  LOG_DIR                                          where the logs go (logs)
  LOG_ROTATION, LOG_MAX_FILES                      daily | hourly, files kept (daily, 14)
  CDC_BIN_DIR                                      use binaries from here; no build
  DB_BACKEND                                       auto | docker | local | external (auto)
  START_TIMEOUT, STOP_TIMEOUT                      seconds (60, 30)
  EXTRACTOR_METRICS_ADDR, LOADER_METRICS_ADDR      /metrics, /healthz, /readyz (127.0.0.1:9187,
                                                   127.0.0.1:9188; off)
EOF
}

main() {
  local cmd="${1:-help}"
  [[ $# -gt 0 ]] && shift
  case "$cmd" in
    start)     cmd_start ;;
    status)    cmd_status ;;
    stop)      cmd_stop "$@" ;;
    restart)   cmd_stop --keep-db; cmd_start ;;
    loader)    cmd_loader ;;
    db-up)     db_up ;;
    db-down)   db_down ;;
    db-status) db_status ;;
    help|-h|--help) cmd_help ;;
    *) cmd_help >&2; exit 2 ;;
  esac
}

main "$@"
