#!/usr/bin/env bash
# Command 1 of the README: install what is missing, build, and start pare-server on its
# embedded default (./pare-data: SQLite + blob files, one local worker), then show it
# working with a real job (scripts/demo.sh). The server keeps running until Ctrl-C.
# Flags after `--` go to pare-server; PARE_DEMO=0 skips the demo.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/install-deps.sh"
"$root/scripts/build.sh"
build=${PARE_BUILD_DIR:-$root/build}
[ "${1:-}" = "--" ] && shift
"$build/server/pare-server" "$@" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server' INT TERM
for _ in $(seq 100); do
  "$build/client/pare" list >/dev/null 2>&1 && break
  kill -0 $server 2>/dev/null || { echo "pare-server exited" >&2; exit 1; }
  sleep 0.2
done
if [ "${PARE_DEMO:-1}" != "0" ]; then
  PARE_BIN_DIR=$build "$root/scripts/demo.sh" || echo "demo failed (the server keeps running)" >&2
fi
echo "pare-server is running (pid $server); Ctrl-C stops it."
wait $server
