#!/usr/bin/env bash
# Issue 22 (item 1): tilt's fine-tuning defaults on problems nobody tuned for. For each seed, a random problem
# (random_tilt_problem: a 2-4 component anisotropic Gaussian mixture in d dimensions, a random linear or quadratic
# reward, the exact tilt in closed form), fine-tuned with ONE configuration (configs/random_family.toml, not tuned
# per problem) by tilt_ode_gap, which scores memoryless-SDE and ODE samples against exact p* (energy distance over
# the noise floor, mean of REPLICATES sets of 2000) and measures the fine-tuned velocity's error per time against
# the exact tilted velocity. Resumable: a seed whose result exists is skipped. One thread per problem; JOBS
# problems at a time. Writes $OUT/seed<S>_d<D>.json and $OUT/summary.md (UPDATE_DOCS=1 copies it to
# $DOC, by default docs/random_family.md).
# Options (environment): OUT=runs/random_family  SEEDS="0 1 ... 9"  ITERATIONS=<config's>  REPLICATES=20  JOBS=1
#                        SETS="key=value ..." (extra --set overrides of the configuration)  DOC=docs/random_family.md
#                        SCORE_STEPS=K (the samplers' steps; default the configuration's num_steps)
# The dsm_until table: OUT=runs/random_family_dsm SETS="finetune.adjoint_matching.dsm_until=0.5"
#                      DOC=docs/random_family_dsm.md UPDATE_DOCS=1 JOBS=2 scripts/random_family.sh
# ... with the exact-step rollouts: OUT=runs/random_family_dsm_exact
#   SETS="finetune.adjoint_matching.dsm_until=0.5 finetune.adjoint_matching.dsm_rollout=exact"
#   DOC=docs/random_family_dsm_exact.md UPDATE_DOCS=1 JOBS=2 scripts/random_family.sh
# ... and on a chain twice as fine (preset = "small" on its K = 60 Euler chain): OUT=runs/random_family_dsm_exact_k120,
#   SETS as above plus finetune.adjoint_matching.dsm_rollout_steps=120, DOC=docs/random_family_dsm_exact_k120.md
# ... and on ten problems drawn after that configuration was fixed: OUT=runs/random_family_heldout
#   SEEDS="10 11 12 13 14 15 16 17 18 19", SETS as for k120, DOC=docs/random_family_heldout.md
# preset = "small" on its exact chain (K = 20): the command in docs/random_family_small_k20_exact.md.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh -DTILT_BUILD_BENCH=ON >/dev/null
out=${OUT:-runs/random_family}
mkdir -p "$out"
seeds=${SEEDS:-0 1 2 3 4 5 6 7 8 9}
# d from 2 to 10 over the ten seeds (seed s >= 10 reuses the table at s mod 10).
dims=(2 3 4 5 6 7 8 9 10 3)
run_one() {
  local s=$1 d=${dims[$(( $1 % 10 ))]}
  local f="$out/seed${s}_d${d}"
  [ -f "$f.json" ] && return 0
  local args=(configs/random_family.toml --random "$s" --dim "$d" --replicates "${REPLICATES:-20}" --hybrids 0 --out "$f")
  [ -n "${ITERATIONS:-}" ] && args+=(--iterations "$ITERATIONS")
  [ -n "${SCORE_STEPS:-}" ] && args+=(--score-steps "$SCORE_STEPS")
  for kv in ${SETS:-}; do args+=(--set "$kv"); done
  build/bench/tilt_ode_gap "${args[@]}" > /dev/null
  echo "seed $s (d = $d) done" >&2
}
export -f run_one 2>/dev/null || true
pids=()
for s in $seeds; do
  run_one "$s" &
  pids+=($!)
  if [ "${#pids[@]}" -ge "${JOBS:-1}" ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
done
wait
python3 scripts/random_family_table.py "$out" > "$out/summary.md"
cat "$out/summary.md"
if [ "${UPDATE_DOCS:-0}" = 1 ]; then cp "$out/summary.md" "${DOC:-docs/random_family.md}"; fi
