#!/usr/bin/env bash
# Two real PostgreSQL clusters (source and warehouse) for machines without a Docker engine:
# initdb/pg_ctl under a git-ignored project directory, same ports and settings as
# docker-compose.yml, init-scripts applied on first start. Works as root (clusters run as the
# `postgres` OS user) and as a normal user.
#
#   scripts/local-db.sh start|stop [source|warehouse]|status|reset
#
# Settings (environment or .env): DB_PORT (source, 5434), WAREHOUSE_DB_PORT (5433), DB_NAME,
# WAREHOUSE_DB_NAME, DB_USER/DB_PASSWORD (the clusters' superuser), LOCAL_DB_DIR (.local/pg),
# LOCAL_DB_FAST=1 (fsync off: for throw-away test clusters only), PG_BIN (server binaries).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# Only the settings this script reads; the environment wins over .env.
# shellcheck source=scripts/dotenv.sh
source scripts/dotenv.sh
load_dotenv DB_PORT WAREHOUSE_DB_PORT DB_NAME WAREHOUSE_DB_NAME DB_USER DB_PASSWORD LOCAL_DB_DIR PG_BIN

SOURCE_PORT="${DB_PORT:-5434}"
WAREHOUSE_PORT="${WAREHOUSE_DB_PORT:-5433}"
SOURCE_DB="${DB_NAME:-operational_db}"
WAREHOUSE_DB="${WAREHOUSE_DB_NAME:-warehouse_db}"
SUPERUSER="${DB_USER:-postgres}"
PASSWORD="${DB_PASSWORD:-postgres}"
BASE="${LOCAL_DB_DIR:-$root/.local/pg}"
[[ "$BASE" = /* ]] || BASE="$root/$BASE"

die() { echo "local-db: $*" >&2; exit 1; }

find_pg_bin() {
  if [[ -n "${PG_BIN:-}" ]]; then echo "$PG_BIN"; return; fi
  local d
  for d in /usr/lib/postgresql/15/bin $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -rV) /usr/pgsql-15/bin; do
    if [[ -x "$d/pg_ctl" && -x "$d/initdb" ]]; then echo "$d"; return; fi
  done
  if command -v pg_ctl >/dev/null 2>&1; then dirname "$(command -v pg_ctl)"; return; fi
  die "PostgreSQL server binaries (initdb, pg_ctl) not found. Install them (Debian: apt-get install -y postgresql-15) or set PG_BIN."
}

BIN="$(find_pg_bin)"

# Run a command as the clusters' OS owner: `postgres` when we are root (initdb refuses root).
as_owner() {
  if [[ "$(id -u)" -eq 0 ]]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

psql_at() {
  local PGOPTIONS="-c client_min_messages=warning"; export PGOPTIONS
  local port="$1"; shift
  PGPASSWORD="$PASSWORD" psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U "$SUPERUSER" "$@"
}

port_busy() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

init_cluster() {
  local name="$1" port="$2" dir="$BASE/$1"
  [[ -f "$dir/PG_VERSION" ]] && return 0
  mkdir -p "$BASE"
  if [[ "$(id -u)" -eq 0 ]]; then
    id postgres >/dev/null 2>&1 || die "running as root needs the 'postgres' OS user (it comes with Debian's postgresql package)"
    chown postgres: "$BASE"
  fi
  local pwfile
  pwfile="$(mktemp)" # owner-only: the password is readable by the cluster's owner alone
  printf '%s\n' "$PASSWORD" > "$pwfile"
  if [[ "$(id -u)" -eq 0 ]]; then chown postgres: "$pwfile"; fi
  echo "local-db: initializing $name cluster in $dir"
  as_owner "$BIN/initdb" -D "$dir" -U "$SUPERUSER" --pwfile="$pwfile" -A scram-sha-256 \
    -E UTF8 --locale=C.UTF-8 >"$BASE/$name-initdb.log" 2>&1 \
    || { rm -f "$pwfile"; cat "$BASE/$name-initdb.log" >&2; die "initdb failed for $name"; }
  rm -f "$pwfile"
  local extra=""
  if [[ "${LOCAL_DB_FAST:-0}" = 1 ]]; then
    extra=$'fsync = off\nsynchronous_commit = off\nfull_page_writes = off'
  fi
  as_owner tee -a "$dir/postgresql.conf" >/dev/null <<CONF
# --- scripts/local-db.sh ---
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
max_connections = 200
wal_level = logical
max_replication_slots = 20
max_wal_senders = 20
track_commit_timestamp = on
shared_buffers = 128MB
timezone = 'UTC'
log_timezone = 'UTC'
$extra
CONF
  touch "$BASE/$name.fresh"
}

start_cluster() {
  local name="$1" port="$2" dir="$BASE/$1"
  init_cluster "$name" "$port"
  if as_owner "$BIN/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
    echo "local-db: $name already running on port $port"
    return 0
  fi
  if port_busy "$port"; then
    die "port $port is taken by another server; set $( [[ $name == source ]] && echo DB_PORT || echo WAREHOUSE_DB_PORT ) to a free port"
  fi
  # The source allows prepared transactions (PREPARE TRANSACTION), which the tests of timestamp
  # capture use; given at start so that a cluster made by an older version of this script has it.
  local opts="-p $port"
  [[ $name == source ]] && opts+=" -c max_prepared_transactions=10"
  as_owner "$BIN/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 -o "$opts" start >/dev/null \
    || { tail -n 20 "$dir/server.log" >&2; die "$name cluster failed to start (log: $dir/server.log)"; }
  echo "local-db: $name running on 127.0.0.1:$port"
}

ensure_database() {
  local port="$1" db="$2"
  if [[ "$(psql_at "$port" -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")" != 1 ]]; then
    psql_at "$port" -d postgres -c "CREATE DATABASE \"$db\""
    return 1
  fi
  return 0
}

apply_init_scripts() {
  local f
  for f in "$root"/init-scripts/*.sql; do
    psql_at "$SOURCE_PORT" -d "$SOURCE_DB" -f "$f" >/dev/null
  done
  echo "local-db: init-scripts applied to $SOURCE_DB"
}

stop_cluster() {
  local name="$1" dir="$BASE/$1"
  [[ -f "$dir/PG_VERSION" ]] || return 0
  if as_owner "$BIN/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
    as_owner "$BIN/pg_ctl" -D "$dir" -m fast -w -t 60 stop >/dev/null
    echo "local-db: $name stopped"
  fi
}

status_cluster() {
  local name="$1" port="$2" dir="$BASE/$1"
  if [[ -f "$dir/PG_VERSION" ]] && as_owner "$BIN/pg_ctl" -D "$dir" status >/dev/null 2>&1 \
     && psql_at "$port" -d postgres -tAc 'SELECT 1' >/dev/null 2>&1; then
    echo "$name: running on 127.0.0.1:$port ($dir)"
    return 0
  fi
  echo "$name: not running (port $port)"
  return 1
}

cmd="${1:-}"
case "$cmd" in
  start)
    start_cluster source "$SOURCE_PORT"
    start_cluster warehouse "$WAREHOUSE_PORT"
    if ! ensure_database "$SOURCE_PORT" "$SOURCE_DB" || [[ -f "$BASE/source.fresh" ]]; then
      apply_init_scripts
    fi
    rm -f "$BASE/source.fresh"
    ensure_database "$WAREHOUSE_PORT" "$WAREHOUSE_DB" || true
    rm -f "$BASE/warehouse.fresh"
    ;;
  stop)
    # `stop source` or `stop warehouse` stops one (outage tests); `start` starts it again.
    case "${2:-both}" in
      source|warehouse) stop_cluster "$2" ;;
      both) stop_cluster source; stop_cluster warehouse ;;
      *) die "usage: $0 stop [source|warehouse]" ;;
    esac
    ;;
  status)
    rc=0
    status_cluster source "$SOURCE_PORT" || rc=1
    status_cluster warehouse "$WAREHOUSE_PORT" || rc=1
    exit $rc
    ;;
  reset)
    stop_cluster source
    stop_cluster warehouse
    rm -rf "$BASE"
    echo "local-db: removed $BASE"
    ;;
  *)
    echo "usage: $0 start|stop [source|warehouse]|status|reset" >&2
    exit 2
    ;;
esac
