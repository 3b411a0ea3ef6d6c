#!/usr/bin/env bash
# Issue 22 (item 2): does the training ESS track the distance to p*? Fine-tunes the model `tilt finetune` builds
# from configs/demo_2d.toml (exact p*), records each iteration's path-weight ESS and log Z (docs/equations.md, E104),
# and every EVERY iterations scores the model by the energy distance of SAMPLES memoryless-SDE and ODE samples to
# exact p*, over the noise floor. One thread. Writes $OUT/ess_study.{jsonl,png}; UPDATE_DOCS=1 copies the plot to
# docs/images/ess_vs_distance.png.
# Options (environment): OUT=runs/ess_study  ITERATIONS=<config's>  EVERY=100  SAMPLES=2000
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh -DTILT_BUILD_BENCH=ON >/dev/null
out=${OUT:-runs/ess_study}
mkdir -p "$out"
args=(configs/demo_2d.toml --every "${EVERY:-100}" --samples "${SAMPLES:-2000}" --out "$out/ess_study")
[ -n "${ITERATIONS:-}" ] && args+=(--iterations "$ITERATIONS")
build/bench/tilt_ess_study "${args[@]}"
if [ "${UPDATE_DOCS:-0}" = 1 ]; then cp "$out/ess_study.png" docs/images/ess_vs_distance.png; fi
