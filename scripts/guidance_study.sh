#!/usr/bin/env bash
# Classifier-free guidance DURING fine-tuning on the class-conditional digits (docs/conditions.md, "Guidance
# during fine-tuning"): the three modes of the Adjoint Matching authors' Stable Diffusion code.
#   1. the lean adjoint's norm along guided trajectories of the base, through the unguided and the guided base,
#      at w = 0, 1, 4, 8, 16 (tilt_guidance_study): does guidance in the adjoint blow it up, as reported there?
#   2. Adjoint Matching over all ten classes in each mode: no guidance (w = 0, the AM paper's), guided
#      trajectories only (w = W, the SD code's default), full guidance (trajectories, adjoint and control);
#      each model sampled with the ODE at w = 0 and w = W and scored by tilt eval-images; the adjoint's norm
#      along each trained model's guided trajectories.
# Writes docs/guidance_study.md and docs/images/guidance_adjoint_norm.png; the README quotes them.
#
# Usage: scripts/guidance_study.sh   (environment: OUT (runs/digits_cond, shared with scripts/digits_conditional.sh:
#   the base and classifier are made once), THREADS (0: all cores), ITERATIONS (1000), W (4), N (100 per class),
#   PRETRAIN_ITERATIONS (scripts/digits_cond_settings.sh's, as scripts/digits_conditional.sh))
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
JOBS=${JOBS:-2} scripts/build.sh -DTILT_BUILD_APPS=ON -DTILT_BUILD_BENCH=ON

OUT=${OUT:-runs/digits_cond}
THREADS=${THREADS:-0}
ITERATIONS=${ITERATIONS:-1000}
W=${W:-4}
N=${N:-100}
tilt=build/bin/tilt
study=build/bench/tilt_guidance_study
config=configs/digits_conditional.toml
common=(--set "threads=$THREADS" --set "base.path=$OUT/base/model.pt" --set "reward.path=$OUT/classifier/classifier.pt")
start=$(date +%s)

# The base is scripts/digits_conditional.sh's (scripts/digits_cond_settings.sh): whichever script runs first makes
# the one both use, and the tables in docs/guidance_study.md were made on it.
. scripts/digits_cond_settings.sh
[ -f "$OUT/base/model.pt" ] || $tilt pretrain -c $config --set "threads=$THREADS" \
  --set "pretrain.iterations=${PRETRAIN_ITERATIONS:-$digits_cond_pretrain_iterations}" -o "$OUT/base" -q
[ -f "$OUT/classifier/classifier.pt" ] || $tilt classifier -c $config --set "threads=$THREADS" -o "$OUT/classifier" -q

mkdir -p "$OUT/guidance_samples"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p docs/images
$study -c $config "${common[@]}" --threads "$THREADS" --w 0,1,4,8,16 --png docs/images/guidance_adjoint_norm.png > "$tmp/init.md"

# name | [finetune.adjoint_matching] settings
modes=(
  "none|"
  "trajectories|guidance=$W"
  "full|guidance=$W guidance_adjoint=true guidance_control=true"
)
samples=()
: > "$tmp/trained.md"
for spec in "${modes[@]}"; do
  name=${spec%%|*}
  run="$OUT/guidance_$name"
  sets=(--set "finetune.iterations=$ITERATIONS")
  for s in ${spec#*|}; do sets+=(--set "finetune.adjoint_matching.$s"); done
  if [ ! -f "$run/model.pt" ]; then
    t0=$(date +%s)
    $tilt finetune -c $config "${common[@]}" "${sets[@]}" -o "$run" -q
    echo "$name: $(( $(date +%s) - t0 )) s" >> "$OUT/guidance_times.txt"
  fi
  for w in 0 "$W"; do
    f="$OUT/guidance_samples/${name}_w$w.csv"
    [ -f "$f" ] || $tilt sample -m "$run/model.pt" --noise ode -n "$N" --guidance "$w" --threads "$THREADS" -o "$f"
    samples+=(--samples "$f")
  done
  $study -c $config "${common[@]}" --threads "$THREADS" --model "$run/model.pt" --w "$W" | tail -n +3 |
    sed "s/^|/| $name |/" >> "$tmp/trained.md"
done
for w in 0 "$W"; do
  f="$OUT/guidance_samples/base_w$w.csv"
  [ -f "$f" ] || $tilt sample -m "$OUT/base/model.pt" --noise ode -n "$N" --guidance "$w" --threads "$THREADS" -o "$f"
  samples+=(--samples "$f")
done
$tilt eval-images -c $config "${common[@]}" "${samples[@]}" > "$tmp/eval.txt"
minutes=$(( ($(date +%s) - start + 59) / 60 ))

{
  echo "# Guidance during fine-tuning: the study's tables"
  echo
  echo "Made by \`ITERATIONS=$ITERATIONS W=$W N=$N scripts/guidance_study.sh\` ($minutes min on $(nproc) cores, $(date -u +%Y-%m-%d),"
  echo "base and classifier already made). The base: configs/digits_conditional.toml's class-conditional digits model."
  echo
  echo "## The lean adjoint along guided trajectories of the base"
  echo
  echo "Batch of 64 trajectories of the base guided by w (memoryless SDE, 40 steps, classes drawn uniformly), the lean"
  echo "adjoint run back from a~(1) = -grad log p(c | X^_1) through the base unguided and guided by w. |a(t)| / |a(1)| is"
  echo "the adjoint ODE's own amplification (batch mean of the per-trajectory ratio); a blow-up would show there."
  echo
  cat "$tmp/init.md"
  echo
  echo "## Adjoint Matching in each mode ($ITERATIONS iterations each)"
  echo
  echo "Training time per mode: $(tr '\n' ';' < "$OUT/guidance_times.txt" | sed 's/;$//; s/;/; /g')."
  echo
  echo '```'
  cat "$tmp/eval.txt"
  echo '```'
  echo
  echo "The lean adjoint along each trained model's trajectories guided by w = $W:"
  echo
  echo "| trained in mode | w | adjoint through | mean |a(1)| | |a(0.5)| / |a(1)| | |a(0)| / |a(1)| | max over t of |a(t)| / |a(1)| |"
  echo "|---|---|---|---|---|---|---|"
  cat "$tmp/trained.md"
} > docs/guidance_study.md
echo "wrote docs/guidance_study.md and docs/images/guidance_adjoint_norm.png"
