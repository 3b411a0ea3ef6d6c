#!/usr/bin/env bash
# Sets up, builds and runs every test: unit (the layering check included), CLI, the installed package,
# benchmark smoke run, and the end-to-end fine-tuning claims (ctest label "e2e"); ~12 min on 2 cores
# after the build (4 of them the fuzz corpus).
# TILT_QUICK=1 leaves out the end-to-end claims (~7 min). Extra arguments go to ctest,
# e.g. scripts/test.sh -R unit.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh -DTILT_BUILD_TESTS=ON -DTILT_BUILD_APPS=ON -DTILT_BUILD_BENCH=ON
cd build
if [ "${TILT_QUICK:-0}" = 1 ]; then
  ctest --output-on-failure -LE e2e "$@"
else
  ctest --output-on-failure "$@"
fi
