#!/usr/bin/env bash
# Issue 21 (item 4): the loss family of the unified view of tilting (docs/equations.md, E110-E117) beside Adjoint
# Matching, on the 2-D demo and random problems with exact p* (random_tilt_problem), with ONE configuration (configs/random_family.toml:
# K = 60, batch 256, 2400 iterations, lr 4e-3 cosine), each method with its defaults. tilt_ode_gap scores memoryless-SDE
# and ODE samples against exact p* (energy distance over the noise floor, mean of REPLICATES sets of 2000) and the
# field's error per time against the exact tilted velocity. Resumable: a result that exists is skipped. One thread
# per run, JOBS runs at a time. Writes $OUT/<problem>_<method>.json and $OUT/summary.md (UPDATE_DOCS=1 copies it to
# docs/unified_losses.md).
# Options (environment): OUT=runs/unified_losses  PROBLEMS="demo 8:10" (demo: configs/demo_2d.toml; seed:dimension:
#                        random_tilt_problem, 8:10 a 10-D mixture)  REPLICATES=10  JOBS=1
#                        METHODS="adjoint_matching am_dsm dsm tsm cmcd_kl cmcd_logvar nets"
#                        GRAD_VARIANCE=32 (M minibatch gradients at the final parameters, the table's gradient
#                        columns; 0: none)  GRAD_FROM= (a folder of runs of the same trainings that have the gradient
#                        columns, for a table whose own runs lack them)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh -DTILT_BUILD_BENCH=ON >/dev/null
out=${OUT:-runs/unified_losses}
mkdir -p "$out"
run_one() {
  local seed=${1%%:*} dim=${1##*:} method=$2
  local f="$out/seed${seed}_d${dim}_${method}" problem=(configs/random_family.toml --random "$seed" --dim "$dim")
  # "demo": configs/demo_2d.toml's own problem (8-Gaussian ring, quadratic reward) with the same settings.
  [ "$1" = demo ] && f="$out/demo_${method}" && problem=(configs/demo_2d.toml)
  [ -f "$f.json" ] && return 0
  local sets=(--set "finetune.method=$method")
  # am_dsm: Adjoint Matching with dsm_until = 0.5 (E106).
  [ "$method" = am_dsm ] && sets=(--set finetune.method=adjoint_matching --set finetune.adjoint_matching.dsm_until=0.5)
  build/bench/tilt_ode_gap "${problem[@]}" --replicates "${REPLICATES:-10}" --hybrids 0 \
    --grad-variance "${GRAD_VARIANCE:-32}" "${sets[@]}" --out "$f" > /dev/null
  echo "$1 $method done" >&2
}
pids=()
for p in ${PROBLEMS:-demo 8:10}; do
  for m in ${METHODS:-adjoint_matching am_dsm dsm tsm cmcd_kl cmcd_logvar nets}; do
    run_one "$p" "$m" &
    pids+=($!)
    if [ "${#pids[@]}" -ge "${JOBS:-1}" ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
  done
done
wait
python3 scripts/unified_losses_table.py "$out" ${GRAD_FROM:+"$GRAD_FROM"} > "$out/summary.md"
cat "$out/summary.md"
if [ "${UPDATE_DOCS:-0}" = 1 ]; then cp "$out/summary.md" docs/unified_losses.md; fi
