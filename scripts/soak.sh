#!/usr/bin/env bash
# scripts/soak.sh — the long outage case of issue #13, against clusters of its own.
#
#   scripts/soak.sh [timestamp|logical|both]          (make soak; default: both, in sequence)
#
# For each capture mode: two throw-away clusters (scripts/local-db.sh, on free ports of their
# own, under SOAK_DIR), the looping extractor and scd2-loader with the default connect-retry
# bound (DB_CONNECT_RETRY_SECONDS=60) and the looping mutator's traffic on every table; then a
# warehouse outage of SOAK_OUTAGE_SECONDS, then a source outage of as long, then the mutator
# stops and `scd2-loader verify` must pass once the pipeline has caught up. Extractor and
# loader must stay alive throughout and exit 0 on SIGTERM. Prints a summary per mode and
# exits non-zero when anything failed. The clusters are removed at the end (SOAK_KEEP=1
# keeps the directory with the programs' logs).
#
# Settings (environment only; .env is not read, so the soak never touches your pipeline):
#   SOAK_OUTAGE_SECONDS   length of each outage                          (180)
#   SOAK_RATE             mutator operations per second                  (20)
#   SOAK_CATCHUP_SECONDS  how long catching up after an outage may take  (600)
#   SOAK_SOURCE_PORT, SOAK_WAREHOUSE_PORT   ports of the soak's clusters (free ones)
#   SOAK_DIR              where clusters, change logs and logs go        (/tmp/cdc-soak-<pid>)
#   SOAK_KEEP=1           keep SOAK_DIR afterwards
#   CDC_BIN_DIR           take the binaries from here instead of building (cargo build --release)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODES_ARG="${1:-both}"
case "$MODES_ARG" in
  timestamp|logical) MODES=("$MODES_ARG") ;;
  both) MODES=(timestamp logical) ;;
  -h|--help|help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "soak: usage: $0 [timestamp|logical|both]" >&2; exit 2 ;;
esac

OUTAGE="${SOAK_OUTAGE_SECONDS:-180}"
RATE="${SOAK_RATE:-20}"
CATCHUP="${SOAK_CATCHUP_SECONDS:-600}"
for v in OUTAGE RATE CATCHUP; do
  [[ "${!v}" =~ ^[0-9]+$ && "${!v}" -gt 0 ]] || {
    echo "soak: SOAK_${v/CATCHUP/CATCHUP_SECONDS} must be a whole number above 0 (got '${!v}')" >&2
    exit 2
  }
done
# Under the temporary directory: as root the clusters run as `postgres`, which must reach it.
BASE="${SOAK_DIR:-${TMPDIR:-/tmp}/cdc-soak-$$}"
[[ "$BASE" = /* ]] || BASE="$ROOT/$BASE"

if [[ -n "${CDC_BIN_DIR:-}" ]]; then
  BIN_DIR="$CDC_BIN_DIR"
  [[ "$BIN_DIR" = /* ]] || BIN_DIR="$ROOT/$BIN_DIR"
else
  target_dir="${CARGO_TARGET_DIR:-$ROOT/target}"
  [[ "$target_dir" = /* ]] || target_dir="$ROOT/$target_dir"
  BIN_DIR="$target_dir/release"
  echo "soak: building release binaries (cargo build --release --bins)"
  (cd "$ROOT" && cargo build --release --bins) || { echo "soak: cargo build failed" >&2; exit 1; }
fi
for b in extractor scd2-loader mutator; do
  [[ -x "$BIN_DIR/$b" ]] || { echo "soak: $BIN_DIR/$b not found (make build, or set CDC_BIN_DIR)" >&2; exit 1; }
done
command -v psql >/dev/null || { echo "soak: psql not found (it counts the captured events)" >&2; exit 1; }

say() { echo "soak [$(date -u +%H:%M:%S)] $*"; }

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# A port nothing listens on, below the kernel's range for outgoing connections (a port in
# that range can be held by a client socket, which a connection probe does not see).
free_port() {
  local low=32768 p
  read -r low _ < /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || true
  ((low > 20100)) || low=65535
  for _ in $(seq 1 200); do
    if ((low == 65535)); then p=$((50000 + RANDOM % 10000)); else p=$((20000 + RANDOM % (low - 20000))); fi
    port_busy "$p" || { echo "$p"; return; }
  done
  echo "soak: no free port found" >&2; exit 1
}

# --- one mode -----------------------------------------------------------------------------
DIR="" SRC_PORT="" WH_PORT="" PIDS=()

local_db() {
  LOCAL_DB_DIR="$DIR/pg" DB_PORT="$SRC_PORT" WAREHOUSE_DB_PORT="$WH_PORT" DB_USER=postgres \
    DB_PASSWORD=postgres DB_NAME=operational_db WAREHOUSE_DB_NAME=warehouse_db LOCAL_DB_FAST=1 \
    "$ROOT/scripts/local-db.sh" "$@" >>"$DIR/local-db.log" 2>&1
}

# The soak's settings for the binaries, and nothing of the caller's (env -i): no .env (they
# run in $DIR) and no exported setting of a real pipeline reaches them.
envs() {
  ENVS=(PATH="$PATH" HOME="${HOME:-/root}" DB_CONNECT_RETRY_SECONDS="${RETRY:-60}"
    DB_HOST=127.0.0.1 DB_PORT="$SRC_PORT" DB_USER=postgres DB_PASSWORD=postgres
    WAREHOUSE_DB_HOST=127.0.0.1 WAREHOUSE_DB_PORT="$WH_PORT" WAREHOUSE_DB_USER=postgres
    WAREHOUSE_DB_PASSWORD=postgres CDC_CAPTURE_MODE="$MODE" CDC_TABLES='public.*'
    CDC_LOG_DIR="$DIR/cdc_logs" CDC_STATE_DIR="$DIR/state" MUTATION_TABLES=all
    MUTATION_RATE="$RATE" EXTRACTOR_METRICS_ADDR=off LOADER_METRICS_ADDR=off LOG_LEVEL=info
    LOG_OUTPUT=file LOG_DIR="$DIR/logs")
}

# Runs binary $1 (then its arguments) in the foreground, logging to its stderr.
binary() {
  local name="$1"; shift
  envs
  (cd "$DIR" && exec env -i "${ENVS[@]}" LOG_OUTPUT=stderr "$BIN_DIR/$name" "$@")
}

# Starts binary $1 in the background (its own PID: the subshell execs it); its stderr (a
# crash's last words) goes to logs/$1.stderr.
launch() {
  envs
  (cd "$DIR" && exec env -i "${ENVS[@]}" "$BIN_DIR/$1") >>"$DIR/logs/$1.stderr" 2>&1 </dev/null &
  PIDS+=("$!")
  eval "PID_${1//-/_}=$!"
}

pid_of() { local v="PID_${1//-/_}"; echo "${!v}"; }
# Alive: the process exists and is not a zombie.
alive() {
  local pid state
  pid="$(pid_of "$1")"
  kill -0 "$pid" 2>/dev/null || return 1
  state="$(ps -o stat= -p "$pid" 2>/dev/null || true)"
  [[ -n "$state" && "$state" != Z* ]]
}

wh_sql() {
  PGPASSWORD=postgres psql -X -qtA -h 127.0.0.1 -p "$WH_PORT" -U postgres -d warehouse_db -c "$1"
}

pending_files() {
  find "$DIR/cdc_logs" -maxdepth 1 -name '*.jsonl' -type f 2>/dev/null | wc -l | tr -d ' '
}

FAILURES=()
fail() { FAILURES+=("$MODE: $*"); say "FAILED: $*"; }

check_alive() {
  local name
  for name in extractor scd2-loader; do
    alive "$name" || fail "$name exited $1 (see $DIR/logs/$name.stderr)"
  done
  if ((TRAFFIC)) && ! alive mutator; then
    say "the mutator (traffic) exited $1; restarting it"
    MUTATOR_RESTARTS=$((MUTATOR_RESTARTS + 1))
    launch mutator
  fi
}

# Waits up to CATCHUP seconds until no change-log file is pending; prints the seconds it took.
wait_backlog() {
  local start=$SECONDS
  while (( $(pending_files) > 0 )); do
    if (( SECONDS - start >= CATCHUP )); then return 1; fi
    sleep 1
  done
  echo $((SECONDS - start))
}

# `status` itself gives up on an unreachable database after 2 s (the programs after 60 s).
status_says() { grep -F -- "$1" "$DIR/logs/status.out" >/dev/null; }

# One outage of $1 (source|warehouse): stop it, keep it down OUTAGE seconds while checking
# that both programs live and that status names the wait, start it again. Sets OUTAGE_LEN.
outage() {
  local what="$1" start said_ext=0 said_loader=0
  say "stopping the $what for ${OUTAGE}s"
  local_db stop "$what"
  start=$SECONDS
  while (( SECONDS - start < OUTAGE )); do
    sleep "$(( OUTAGE - (SECONDS - start) < 5 ? OUTAGE - (SECONDS - start) : 5 ))"
    check_alive "during the $what outage"
    # Asked while there is time left for it, so the outage lasts as long as it should.
    if (( OUTAGE - (SECONDS - start) >= 8 )); then
      RETRY=2 binary scd2-loader status >"$DIR/logs/status.out" 2>&1 || true
      status_says "extractor waiting for the $what database" && said_ext=1
      status_says "loader waiting for the $what database" && said_loader=1
    fi
  done
  # Started again; a port briefly held by a client socket is tried again for a minute.
  local tries=0
  until local_db start; do
    tries=$((tries + 1))
    if ((tries >= 12)); then fail "scripts/local-db.sh start after the $what outage failed (see $DIR/local-db.log)"; break; fi
    sleep 5
  done
  OUTAGE_LEN=$((SECONDS - start))
  say "$what back after ${OUTAGE_LEN}s"
  # The loader waits for either database (it reads the source's catalog at start-up only);
  # the extractor waits for both (its run records go to the warehouse).
  ((said_ext)) || fail "status never said 'extractor waiting for the $what database'"
  if [[ "$what" == warehouse ]]; then
    ((said_loader)) || fail "status never said 'loader waiting for the warehouse database'"
  fi
}

# Gives up on this mode: stops its programs and clusters.
abort_mode() {
  fail "$1"
  local p
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
  local_db reset || true
}

soak_mode() {
  MODE="$1" DIR="$BASE/$1" PIDS=() MUTATOR_RESTARTS=0 TRAFFIC=1
  rm -rf "$DIR"
  mkdir -p "$DIR/logs" "$DIR/cdc_logs" "$DIR/state"
  local attempt
  for attempt in 1 2 3; do
    SRC_PORT="${SOAK_SOURCE_PORT:-$(free_port)}"
    WH_PORT="${SOAK_WAREHOUSE_PORT:-$(free_port)}"
    while [[ "$WH_PORT" == "$SRC_PORT" ]]; do WH_PORT="$(free_port)"; done
    say "$MODE: clusters on 127.0.0.1:$SRC_PORT (source) and :$WH_PORT (warehouse) in $DIR"
    if local_db start; then break; fi
    local_db reset || true
    # Chosen ports can be taken in the meantime: others are tried; given ones are not.
    if [[ -n "${SOAK_SOURCE_PORT:-}${SOAK_WAREHOUSE_PORT:-}" ]] || ((attempt == 3)); then
      abort_mode "scripts/local-db.sh start failed (see $DIR/local-db.log)"
      return
    fi
  done
  binary extractor setup >>"$DIR/logs/setup.out" 2>&1 || { abort_mode "extractor setup failed"; return; }

  local t0=$SECONDS
  launch extractor; launch scd2-loader; launch mutator
  say "extractor, scd2-loader and mutator (${RATE} ops/s) started"
  local start=$SECONDS
  until [[ -n "$(find "$DIR/cdc_logs/processed" -type f 2>/dev/null | head -n 1)" ]]; do
    check_alive "at start-up"
    if (( SECONDS - start > 120 )); then abort_mode "nothing applied within 120 s"; return; fi
    sleep 1
  done
  sleep 20   # some traffic before the first outage
  check_alive "before the outages"

  outage warehouse; WH_OUTAGE=$OUTAGE_LEN
  local pending_after_wh; pending_after_wh="$(pending_files)"
  WH_CATCHUP="$(wait_backlog)" || { fail "backlog not applied within ${CATCHUP}s after the warehouse outage"; WH_CATCHUP="> $CATCHUP"; }
  check_alive "after the warehouse outage"

  outage source; SRC_OUTAGE=$OUTAGE_LEN
  sleep 20   # traffic again after the source is back
  check_alive "after the source outage"

  # Stop the traffic, then wait until the history has caught up: verify passes.
  TRAFFIC=0
  kill -TERM "$(pid_of mutator)" 2>/dev/null || true
  wait "$(pid_of mutator)" 2>/dev/null || true
  local vstart=$SECONDS vrc=1
  while :; do
    vrc=0; RETRY=10 binary scd2-loader verify --settle-seconds 10 >"$DIR/logs/verify.out" 2>&1 || vrc=$?
    ((vrc == 0)) && break
    if (( SECONDS - vstart >= CATCHUP )); then break; fi
    sleep 5
  done
  VERIFY_SECS=$((SECONDS - vstart))
  if ((vrc == 0)); then VERIFY="passed"; else VERIFY="FAILED (exit $vrc, $DIR/logs/verify.out)"; fail "verify exit $vrc"; fi
  check_alive "at the end"

  local captured applied versions mutations
  captured="$(wh_sql "SELECT coalesce(sum(records_processed), 0) FROM pipeline_metadata WHERE pipeline_name = 'cdc_extractor'")"
  applied="$(wh_sql "SELECT coalesce(sum(events), 0) FROM cdc_applied_batches")"
  versions="$(wh_sql "SELECT coalesce(sum(versions_inserted), 0) FROM cdc_applied_batches")"
  mutations="$({ grep -ho 'mutator: [0-9]* operations' "$DIR/logs/mutator.stderr" || true; } | awk '{s += $2} END {print s + 0}')"
  # Every captured event reached the history's batch records, no more and no fewer.
  [[ "$captured" == "$applied" ]] || fail "$captured events captured but $applied applied"

  # SIGTERM: both must exit 0.
  local name code alive_all=yes
  for name in extractor scd2-loader; do
    if alive "$name"; then
      kill -TERM "$(pid_of "$name")"
      code=0; wait "$(pid_of "$name")" || code=$?
      ((code == 0)) || { fail "$name exited $code on SIGTERM"; alive_all=no; }
    else
      alive_all=no
    fi
  done
  local_db reset || true
  PIDS=()
  local mode_failed=no
  for f in "${FAILURES[@]+"${FAILURES[@]}"}"; do [[ "$f" == "$MODE:"* ]] && mode_failed=yes; done
  [[ "$alive_all" == yes && "$mode_failed" == no ]] || alive_all="${alive_all/yes/yes (but see failures)}"

  SUMMARY+=("$(cat <<EOF
== $MODE ($(( SECONDS - t0 )) s)
  warehouse outage   ${WH_OUTAGE} s (pending change-log files when it ended: ${pending_after_wh}; backlog applied ${WH_CATCHUP} s later)
  source outage      ${SRC_OUTAGE} s
  traffic            ${mutations} operations by the mutator at ${RATE}/s (restarted ${MUTATOR_RESTARTS} times)
  events             ${captured} captured (extractor run records), ${applied} applied, ${versions} history versions
  verify             ${VERIFY} (${VERIFY_SECS} s after the traffic stopped)
  extractor, loader  alive throughout and exit 0 on SIGTERM: ${alive_all}
EOF
)")
}

cleanup() {
  local p
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do wait "$p" 2>/dev/null || true; done
  if [[ -n "$DIR" && -d "$DIR/pg" ]]; then local_db reset || true; fi
  if [[ "${SOAK_KEEP:-0}" != 1 ]]; then rm -rf "$BASE"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

SUMMARY=()
for m in "${MODES[@]}"; do
  soak_mode "$m"
done

echo
echo "soak summary (outages of ${OUTAGE} s, DB_CONNECT_RETRY_SECONDS=60)"
for s in "${SUMMARY[@]+"${SUMMARY[@]}"}"; do echo "$s"; done
if ((${#FAILURES[@]} > 0)); then
  echo "soak: FAILED"
  for f in "${FAILURES[@]}"; do echo "  $f"; done
  [[ "${SOAK_KEEP:-0}" == 1 ]] || echo "  (SOAK_KEEP=1 keeps $BASE with the programs' logs)"
  exit 1
fi
echo "soak: passed"
