#!/usr/bin/env bash
# Sets up, builds and runs the benchmarks of one Adjoint Matching iteration and its parts, on 2
# threads (TILT_THREADS to change). Extra arguments go to Google Benchmark, e.g.
# scripts/bench.sh --benchmark_filter=Iteration. Run nothing else meanwhile: two OpenMP jobs on the
# same cores slow each other down by up to 10x.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh -DTILT_BUILD_BENCH=ON
build/bench/tilt_bench --benchmark_min_time=1 "$@"
