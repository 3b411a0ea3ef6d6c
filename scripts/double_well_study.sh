#!/usr/bin/env bash
# Issue 22, item 5: what makes Adjoint Matching reduce the double well's control L2 error 10x
# (tilt soc --problem double_well, d = 10; docs/double_well.md). Each variant is one `tilt soc` run of
# adjoint_matching at one thread in $OUT/<variant>/; a finished one (summary.json) is skipped, so the
# script resumes. PARALLEL runs go side by side (2 on the 2-core machine). At the end
# scripts/double_well_table.py writes docs/double_well.md (the table, the curves' milestones, where u*
# lives in time) and tilt_soc_curves draws docs/images/double_well_study.png.
#
# Options (environment): OUT=runs/double_well_study  PARALLEL=2  NO_BUILD=0  DOC=docs/double_well.md
#   VARIANTS="<name> ..." (a subset of the list below)  SCALE=1 (multiplies every variant's iterations)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/double_well_study}
mkdir -p "$out"
[ "${NO_BUILD:-0}" = 1 ] || { JOBS=${JOBS:-2} scripts/build.sh -DTILT_BUILD_APPS=ON -DTILT_BUILD_BENCH=ON >/dev/null; }
tilt=build/bin/tilt

# name | iterations | flags (every run: adjoint_matching, batch 128, 200 steps, seed 0, eval every 100 on 1024 paths)
all_variants='
mlp_lr1e-3|1000|--control mlp --hidden 128,128 --lr 1e-3
mlp_lr1e-2|1000|--control mlp --hidden 128,128 --lr 1e-2
mlp_damped|1000|--control mlp --hidden 128,128 --lr 1e-3 --time-weights damped
mlp_curriculum|1000|--control mlp --hidden 128,128 --lr 1e-3 --curriculum-start 0.2 --curriculum-fraction 0.5
separable_lr3e-3|1000|--control separable --hidden 32,32 --lr 3e-3
separable_damped|1000|--control separable --hidden 32,32 --lr 3e-3 --time-weights damped
separable_curriculum|1000|--control separable --hidden 32,32 --lr 3e-3 --curriculum-start 0.2 --curriculum-fraction 0.5
separable_2500_cosine|2500|--control separable --hidden 32,32 --lr 3e-3 --lr-schedule cosine
separable_damped_1500_cosine|1500|--control separable --hidden 32,32 --lr 3e-3 --lr-schedule cosine --time-weights damped'
selected=${VARIANTS:-$(echo "$all_variants" | sed '/^$/d' | cut -d'|' -f1)}
scale=${SCALE:-1}

run_variant() {
  local name=$1 line iterations flags dir start
  line=$(echo "$all_variants" | grep "^$name|") || { echo "unknown variant '$name'" >&2; return 1; }
  iterations=$(( $(echo "$line" | cut -d'|' -f2) * scale ))
  flags=$(echo "$line" | cut -d'|' -f3)
  dir=$out/$name
  if [ -f "$dir/summary.json" ]; then echo "done already: $name"; return 0; fi
  rm -rf "$dir"
  start=$(date +%s.%N)
  # shellcheck disable=SC2086
  "$tilt" soc -q -p double_well -l adjoint_matching --iterations "$iterations" --threads 1 --seed 0 \
    --eval-every 100 --eval-batch 1024 $flags -o "$dir" > "$dir.log" 2>&1 || { echo "failed: $name ($dir.log)" >&2; return 1; }
  echo "$(date +%s.%N) - $start" | bc > "$dir/wall_seconds"
  echo "finished: $name ($(cat "$dir/wall_seconds") s)"
}
export -f run_variant
export all_variants out tilt scale
echo "$selected" | tr ' ' '\n' | sed '/^$/d' | xargs -P "${PARALLEL:-2}" -I{} bash -c 'run_variant "$@"' _ {}

doc=${DOC:-docs/double_well.md}
python3 scripts/double_well_table.py "$out" > "$doc"
echo "wrote $doc"
if [ -x build/bench/tilt_soc_curves ]; then
  args=()
  for name in $selected; do
    [ -f "$out/$name/adjoint_matching.eval.jsonl" ] && args+=("$name=$out/$name/adjoint_matching.eval.jsonl")
  done
  mkdir -p docs/images
  build/bench/tilt_soc_curves -o docs/images/double_well_study.png --title "double well (d = 10): adjoint matching" "${args[@]}"
  echo "wrote docs/images/double_well_study.png"
fi
