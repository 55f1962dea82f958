#!/usr/bin/env bash
# Reads settings from .env the way the binaries (dotenvy) do, for run_pipeline.sh,
# scripts/local-db.sh and the Makefile alike: the environment wins over .env, the first line
# of a key wins, `export ` prefixes and CRLF line ends are accepted, and one pair of
# surrounding quotes ("..." or '...') is removed.
#
#   source scripts/dotenv.sh; load_dotenv VAR...   sets each VAR found (not exported)
#   scripts/dotenv.sh VAR                          prints VAR's value (empty when unset)
#
# DOTENV_FILE names another file than ./.env.

load_dotenv() {
  local file=${DOTENV_FILE:-.env} line key value
  [[ -f "$file" ]] || return 0
  while IFS= read -r line || [[ -n "$line" ]]; do
    line=${line%$'\r'}
    line="${line#export }"
    [[ "$line" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || continue
    key="${line%%=*}"
    value="${line#*=}"
    [[ " $* " == *" $key "* ]] || continue
    [[ -n "${!key+set}" ]] && continue
    if [[ "$value" =~ ^\"(.*)\"$ || "$value" =~ ^\'(.*)\'$ ]]; then value="${BASH_REMATCH[1]}"; fi
    printf -v "$key" '%s' "$value"
  done < "$file"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  [[ $# -eq 1 && "$1" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || { echo "usage: $0 VAR" >&2; exit 2; }
  load_dotenv "$1"
  printf '%s\n' "${!1:-}"
fi
