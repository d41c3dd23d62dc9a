#!/usr/bin/env bash
# Command 2 of the README: install what is missing, build, run the whole test suite.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/install-deps.sh"
"$root/scripts/build.sh"
# The C++ follows .clang-format (scripts/check-format.sh --fix rewrites what does not); a file
# that does not fails the command, after the tests have run.
format=0
"$root/scripts/check-format.sh" || format=1
cd "${PARE_BUILD_DIR:-$root/build}"
ctest --output-on-failure --timeout 900 -j "${PARE_TEST_JOBS:-2}" "$@"
# libFuzzer targets, a short run each (PARE_FUZZ_SECONDS=0 skips it on machines without clang).
if [ "${PARE_FUZZ_SECONDS:-10}" != 0 ]; then
  "$root/scripts/fuzz.sh" "${PARE_FUZZ_SECONDS:-10}"
fi
exit $format
