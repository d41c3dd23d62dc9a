#!/usr/bin/env bash
# Configures and builds Pare into ./build (or $PARE_BUILD_DIR) with Ninja and ccache.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${PARE_BUILD_DIR:-$root/build}
jobs=${PARE_JOBS:-$(nproc)}
extra=()
[ "${CI:-}" = "true" ] && extra+=(-DPARE_WERROR=ON)
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo "${extra[@]}" "$@"
cmake --build "$build" -j "$jobs"
