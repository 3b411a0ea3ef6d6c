#!/usr/bin/env bash
# Sets up, builds and runs every test: unit (the layering check included), CLI, the installed package,
# benchmark smoke run, and the end-to-end fine-tuning claims (ctest label "e2e"); ~16 min on 2 cores
# after the build (~10 min cold), tests two at a time where they share the cores (cmake/tests.cmake).
# TILT_QUICK=1 leaves out the end-to-end claims (~12 min). Extra arguments go to ctest,
# e.g. scripts/test.sh -R unit.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh -DTILT_BUILD_TESTS=ON -DTILT_BUILD_APPS=ON -DTILT_BUILD_BENCH=ON
cd build
# As many tests at once as there are cores (TILT_TEST_JOBS to change it); cmake/tests.cmake says which run alone.
jobs=(-j "${TILT_TEST_JOBS:-$(nproc)}")
if [ "${TILT_QUICK:-0}" = 1 ]; then
  ctest --output-on-failure "${jobs[@]}" -LE e2e "$@"
else
  ctest --output-on-failure "${jobs[@]}" "$@"
fi
