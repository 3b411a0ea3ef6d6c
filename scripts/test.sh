#!/usr/bin/env bash
# Sets up, builds and runs the tests: unit and CLI tests (~1 min after the build).
# TILT_SLOW=1 also runs the end-to-end fine-tuning claims (ctest label "slow", ~23 min on 2 cores).
# Extra arguments go to ctest, e.g. scripts/test.sh -R unit.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh -DTILT_BUILD_TESTS=ON -DTILT_BUILD_APPS=ON -DTILT_BUILD_BENCH=ON
cd build
if [ "${TILT_SLOW:-0}" = 1 ]; then
  ctest --output-on-failure "$@"
else
  ctest --output-on-failure -LE slow "$@"
fi
