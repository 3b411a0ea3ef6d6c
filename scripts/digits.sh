#!/usr/bin/env bash
# Reward fine-tuning on the 8x8 digits (issue 4): pretrains the base flow model and the classifier,
# fine-tunes towards r(x) = log p(c | x) with Adjoint Matching and with each baseline under the
# same budget, samples each model with the flow ODE, and evaluates them (class share, diversity,
# Frechet distance) with sample grids.
#   scripts/digits.sh                 # ~25 min on 2 cores (+ ~10 min for the policy-gradient runs);
#                                     # runs in runs/digits, skips finished runs
#   UPDATE_DOCS=1 scripts/digits.sh   # also refreshes docs/digits_eval.txt and docs/images/digits.png
# Environment: OUT (runs/digits), THREADS (0: all cores), CLASS (3), ITERATIONS (1000), N (1000);
# ONLY="am refl" trains just those runs and stops (to train runs in parallel, one thread each).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh -DTILT_BUILD_APPS=ON

OUT=${OUT:-runs/digits}
THREADS=${THREADS:-0}
CLASS=${CLASS:-3}
ITERATIONS=${ITERATIONS:-1000}
N=${N:-1000}
tilt=build/bin/tilt
config=configs/digits.toml
common=(--set "threads=$THREADS" --set "base.path=$OUT/base/model.pt"
        --set "reward.path=$OUT/classifier/classifier.pt" --set "reward.class=$CLASS")

[ -f "$OUT/base/model.pt" ] || $tilt pretrain -c $config --set "threads=$THREADS" -o "$OUT/base"
[ -f "$OUT/classifier/classifier.pt" ] || $tilt classifier -c $config --set "threads=$THREADS" -o "$OUT/classifier"

# name | settings (the rest is configs/digits.toml's [finetune])
runs=(
  "am|finetune.method=\"adjoint_matching\""
  "am_sigma1|finetune.noise=\"constant:1\""
  "discrete_adjoint|finetune.method=\"discrete_adjoint\""
  "draft1|finetune.method=\"draft\" finetune.draft.draft_k=1"
  "draft40|finetune.method=\"draft\" finetune.draft.draft_k=40"
  "refl|finetune.method=\"refl\""
  # The baselines have no KL term: at Adjoint Matching's lr they hack the reward; lower lrs trade
  # reward for staying near the base.
  "draft1_lr1e-4|finetune.method=\"draft\" finetune.draft.draft_k=1 finetune.lr=1e-4"
  "draft1_lr1e-5|finetune.method=\"draft\" finetune.draft.draft_k=1 finetune.lr=1e-5"
  "refl_lr1e-4|finetune.method=\"refl\" finetune.lr=1e-4"
  # Policy-gradient baselines (docs/policy_gradient.md), with DDPO's gradient-norm clip of 1.
  "ddpo|finetune.method=\"ddpo\" finetune.grad_clip=1.0"
  "ddpo_epochs4|finetune.method=\"ddpo\" finetune.grad_clip=1.0 finetune.ddpo.inner_epochs=4"
  "grpo|finetune.method=\"grpo\" finetune.grad_clip=1.0"
  "mixgrpo|finetune.method=\"grpo\" finetune.grad_clip=1.0 finetune.grpo.window=4"
  "ddpo_lr1e-4|finetune.method=\"ddpo\" finetune.grad_clip=1.0 finetune.lr=1e-4"
  "grpo_lr1e-4|finetune.method=\"grpo\" finetune.grad_clip=1.0 finetune.lr=1e-4"
)
[ -n "${ONLY:-}" ] || $tilt sample -m "$OUT/base/model.pt" --noise ode -n "$N" --threads "$THREADS" -o "$OUT/base/samples_ode.csv"
samples=("$OUT/base/samples_ode.csv")
panels=("$OUT/base/samples_ode.csv:base")
for spec in "${runs[@]}"; do
  name=${spec%%|*}
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then continue; fi
  sets=()
  for s in ${spec#*|}; do sets+=(--set "$s"); done
  if [ ! -f "$OUT/$name/model.pt" ]; then
    $tilt finetune -c $config "${common[@]}" --set "finetune.iterations=$ITERATIONS" "${sets[@]}" -o "$OUT/$name" \
      ${TILT_QUIET:+-q}
  fi
  $tilt sample -m "$OUT/$name/model.pt" --noise ode -n "$N" --threads "$THREADS" -o "$OUT/$name/samples_ode.csv"
  samples+=("$OUT/$name/samples_ode.csv")
  # The policy-gradient runs have their own grid (scripts/policy_gradient.sh).
  [[ $name == *_lr* || $name == *ddpo* || $name == *grpo* ]] || panels+=("$OUT/$name/samples_ode.csv:$name")
done
if [ -n "${ONLY:-}" ]; then exit 0; fi
# Adjoint Matching's model sampled with the memoryless SDE as well: the same law, any schedule.
$tilt sample -m "$OUT/am/model.pt" -n "$N" --threads "$THREADS" -o "$OUT/am/samples_sde.csv"
samples+=("$OUT/am/samples_sde.csv")

# The target p* itself, for reference: 20000 base samples reweighted by p(c | x)^lambda.
[ -f "$OUT/base/samples_20k.csv" ] ||
  $tilt sample -m "$OUT/base/model.pt" --noise ode -n 20000 --seed 1 --threads "$THREADS" -o "$OUT/base/samples_20k.csv"
args=()
for s in "${samples[@]}"; do args+=(--samples "$s"); done
$tilt eval-images -c $config "${common[@]}" "${args[@]}" --base "$OUT/base/samples_20k.csv" | tee "$OUT/eval.txt"
$tilt plot --images 8x8 --max-images 50 --columns 4 "${panels[@]}" -o "$OUT/grid.png" \
  --title "digits: fine-tuned towards log p($CLASS | x), sampled with the ODE"
if [ "${UPDATE_DOCS:-0}" = 1 ]; then
  cp "$OUT/eval.txt" docs/digits_eval.txt
  cp "$OUT/grid.png" docs/images/digits.png
fi
