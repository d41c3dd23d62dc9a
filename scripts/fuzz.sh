#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (build-fuzz/) and runs each for SECONDS (default 10)
# on a copy of its checked-in seed corpus (fuzz/corpus/<target>). Any crash, leak or hang
# fails the run and leaves the input in build-fuzz/artifacts/. Longer runs: fuzz/README.md.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:-10}
build=${PARE_FUZZ_BUILD_DIR:-$root/build-fuzz}
CXX=clang++ cmake -S "$root" -B "$build" -G Ninja -DPARE_FUZZ=ON -DPARE_BUILD_TESTS=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build" --target fuzz_upload fuzz_recipe fuzz_dataset
mkdir -p "$build/artifacts"
for target in upload recipe dataset; do
  corpus=$(mktemp -d)
  cp "$root/fuzz/corpus/$target/"* "$corpus/"
  echo "fuzz_$target: ${seconds}s"
  "$build/fuzz/fuzz_$target" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 \
    -artifact_prefix="$build/artifacts/" "$corpus" 2>"$build/fuzz_$target.log" \
    || { tail -40 "$build/fuzz_$target.log"; echo "fuzz_$target FAILED (input in $build/artifacts/)"; exit 1; }
  grep -E "^Done" "$build/fuzz_$target.log"
  rm -rf "$corpus"
done
