#!/usr/bin/env bash
# The policy-gradient baselines (DDPO, GRPO, MixGRPO's window; docs/policy_gradient.md) on the 8x8
# digits problem of scripts/digits.sh, under the same budget as its other rows (1000 iterations,
# batch 64, K = 40, lr 1e-3), sampled with the flow ODE and evaluated like them (class share,
# diversity, Frechet distance), with the base and the target p* for reference.
#   scripts/policy_gradient.sh                 # ~10 min on one thread (pretrains the base and the
#                                              # classifier first if runs/digits has none, ~2 min)
#   UPDATE_DOCS=1 scripts/policy_gradient.sh   # also refreshes docs/policy_gradient_eval.txt and
#                                              # docs/images/policy_gradient.png
# Environment: OUT (runs/digits), THREADS (1), N (1000), as scripts/digits.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/digits}
THREADS=${THREADS:-1}
N=${N:-1000}
export OUT THREADS N
names="ddpo ddpo_epochs4 grpo mixgrpo ddpo_lr1e-4 grpo_lr1e-4"
ONLY="$names" scripts/digits.sh   # pretrains if needed, trains and samples (with the ODE) only these runs
tilt=build/bin/tilt
config=configs/digits.toml
common=(--set "threads=$THREADS" --set "base.path=$OUT/base/model.pt" --set "reward.path=$OUT/classifier/classifier.pt")
[ -f "$OUT/base/samples_ode.csv" ] ||
  $tilt sample -m "$OUT/base/model.pt" --noise ode -n "$N" --threads "$THREADS" -o "$OUT/base/samples_ode.csv"
[ -f "$OUT/base/samples_20k.csv" ] ||
  $tilt sample -m "$OUT/base/model.pt" --noise ode -n 20000 --seed 1 --threads "$THREADS" -o "$OUT/base/samples_20k.csv"
args=(--samples "$OUT/base/samples_ode.csv")
panels=("$OUT/base/samples_ode.csv:base")
for name in $names; do
  args+=(--samples "$OUT/$name/samples_ode.csv")
  [[ $name == *_lr* ]] || panels+=("$OUT/$name/samples_ode.csv:$name")
done
$tilt eval-images -c $config "${common[@]}" "${args[@]}" --base "$OUT/base/samples_20k.csv" | tee "$OUT/eval_policy_gradient.txt"
$tilt plot --images 8x8 --max-images 50 --columns 5 "${panels[@]}" -o "$OUT/grid_policy_gradient.png" \
  --title "digits: policy-gradient baselines towards log p(3 | x), sampled with the ODE"
if [ "${UPDATE_DOCS:-0}" = 1 ]; then
  cp "$OUT/eval_policy_gradient.txt" docs/policy_gradient_eval.txt
  cp "$OUT/grid_policy_gradient.png" docs/images/policy_gradient.png
fi
