#!/usr/bin/env bash
# Installs what bench/run.py needs besides the event loops themselves:
#   - wrk (Debian package) for the HTTP rows; without it run.py skips them with a note;
#   - with a PYTHON argument, bench/requirements.txt into that interpreter's environment
#     (uvloop, rloop, uvicorn, httptools, matplotlib), so an older venv picks up new entries.
# bench/loadgen (the Rust load client) is built by run.py itself with cargo.
#
# usage: bash bench/install-tools.sh [PYTHON]        (`make bench` runs it)
# Never fails the benchmark run: what cannot be installed is reported, and run.py shows n/a.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if command -v wrk >/dev/null 2>&1; then
  :
elif command -v apt-get >/dev/null 2>&1; then
  sudo=()
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo=(sudo -n); else
      echo "!!! wrk is missing and installing it needs root: apt-get install wrk (HTTP rows skipped)"
    fi
  fi
  if [ "$(id -u)" = 0 ] || [ ${#sudo[@]} -gt 0 ]; then
    echo "--- installing wrk (apt-get) for the HTTP benchmarks"
    if ! { "${sudo[@]}" apt-get update -qq &&
           "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }; then
      echo "!!! could not install wrk: the HTTP rows will be skipped"
    fi
  fi
else
  echo "!!! wrk not found and no apt-get here: install wrk by hand for the HTTP rows"
fi

if [ $# -ge 1 ]; then
  if ! "$1" -m pip install -q --disable-pip-version-check -r "$here/requirements.txt"; then
    echo "!!! pip install -r bench/requirements.txt failed: missing loops/tools show as n/a"
  fi
fi
exit 0
