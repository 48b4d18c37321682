#!/usr/bin/env bash
# Puts the Kotlin compiler (npm kotlin-compiler, which bundles kotlin-test-junit) and JUnit 4
# (Debian junit4) on this machine if missing, then prints the compiler's home directory.
# `make tools` (and so `make test`) runs it; idempotent and quiet when present.
# `tools.sh --where` installs nothing: it prints the home, or fails saying what is missing
# (tests/test_android_demo.py uses that).
set -euo pipefail
KOTLIN_VERSION=2.4.20
home="${XDG_CACHE_HOME:-$HOME/.cache}/gemma-aot/kotlinc-$KOTLIN_VERSION"
if [ "${1:-}" = "--where" ]; then
  missing=""
  [ -x "$home/bin/kotlinc" ] || missing="kotlinc $KOTLIN_VERSION ($home)"
  [ -f /usr/share/java/junit4.jar ] || missing="$missing junit4 (/usr/share/java/junit4.jar)"
  if [ -n "$missing" ]; then
    echo "missing:$missing; install them with: make tools" >&2
    exit 1
  fi
  echo "$home"
  exit 0
fi
if [ ! -x "$home/bin/kotlinc" ]; then
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "kotlin-compiler@$KOTLIN_VERSION" >/dev/null 2>&1)
  mkdir -p "$home"
  tar xzf "$tmp"/kotlin-compiler-*.tgz -C "$home" --strip-components=1
  chmod +x "$home"/bin/*
  rm -rf "$tmp"
fi
if [ ! -f /usr/share/java/junit4.jar ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get install -y -qq --no-install-recommends junit4 >/dev/null 2>&1 ||
    { $sudo apt-get update -qq >/dev/null && $sudo apt-get install -y -qq --no-install-recommends junit4 >/dev/null; }
fi
echo "$home"
