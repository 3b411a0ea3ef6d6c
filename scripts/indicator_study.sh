#!/usr/bin/env bash
# Issue 23, item 4: a reward without a gradient. On the 8x8 digits of scripts/digits.sh, r(x) = 1 if the classifier's
# argmax is class 3, else 0 ([reward] form = "indicator"), which only the methods that need reward values alone can
# use: RAM (docs/equations.md, E128), DDPO and GRPO. Beside them, Adjoint Matching, RAM and EAM with path weights
# (E132-E134; the learnt base's score read off its velocity at t = 0.95) on the differentiable log p(3 | x)
# (lambda = 2, configs/digits.toml). A second reward without a gradient: the share of inked pixels
# ([reward] type = "ink", threshold = 0; lambda INK_LAMBDA), with RAM and DDPO, scored by the mean share against the
# target's (the base's samples reweighted by exp(lambda r)). Everything under the digits budget (1000 iterations, batch 64, K = 40, lr 1e-3), sampled with the flow
# ODE and evaluated by `tilt eval-images` (class share under the training classifier and the unseen one, diversity,
# Frechet distance), each group against its own target p* (base samples reweighted by exp(lambda r)); for the
# indicator the target's class share is s0 e^lambda / (s0 e^lambda + 1 - s0), s0 the base's share.
#   scripts/indicator_study.sh                 # ~20 min on one thread (pretrains the base and the classifier
#                                              # first if runs/digits has none, ~2 min)
#   UPDATE_DOCS=1 scripts/indicator_study.sh   # also refreshes docs/indicator_eval.txt and docs/images/indicator.png
# Environment: OUT (runs/digits), THREADS (1), N (1000), ITERATIONS (1000), LAMBDA (3: the indicator's lambda),
#              INK_LAMBDA (10).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh -DTILT_BUILD_APPS=ON
OUT=${OUT:-runs/digits}
THREADS=${THREADS:-1}
N=${N:-1000}
ITERATIONS=${ITERATIONS:-1000}
LAMBDA=${LAMBDA:-3}
INK_LAMBDA=${INK_LAMBDA:-10}
tilt=build/bin/tilt
config=configs/digits.toml
common=(--set "threads=$THREADS" --set "base.path=$OUT/base/model.pt" --set "reward.path=$OUT/classifier/classifier.pt")
[ -f "$OUT/base/model.pt" ] || $tilt pretrain -c $config --set "threads=$THREADS" -o "$OUT/base"
[ -f "$OUT/classifier/classifier.pt" ] || $tilt classifier -c $config --set "threads=$THREADS" -o "$OUT/classifier"
indicator="reward.form=\"indicator\" reward.lambda=$LAMBDA"
runs=(
  "ind_am_logp|finetune.method=\"adjoint_matching\""
  "ind_ram_logp|finetune.method=\"ram\""
  "ind_eam_logp|finetune.method=\"eam\" finetune.eam.path_weights=true"
  "ind_ram|finetune.method=\"ram\" $indicator"
  "ind_ddpo|finetune.method=\"ddpo\" finetune.grad_clip=1.0 $indicator"
  "ind_grpo|finetune.method=\"grpo\" finetune.grad_clip=1.0 $indicator"
)
[ -f "$OUT/base/samples_ode.csv" ] ||
  $tilt sample -m "$OUT/base/model.pt" --noise ode -n "$N" --threads "$THREADS" -o "$OUT/base/samples_ode.csv"
[ -f "$OUT/base/samples_20k.csv" ] ||
  $tilt sample -m "$OUT/base/model.pt" --noise ode -n 20000 --seed 1 --threads "$THREADS" -o "$OUT/base/samples_20k.csv"
panels=("$OUT/base/samples_ode.csv:base")
logp=(--samples "$OUT/base/samples_ode.csv")
ind=(--samples "$OUT/base/samples_ode.csv")
for spec in "${runs[@]}"; do
  name=${spec%%|*}
  sets=()
  for s in ${spec#*|}; do sets+=(--set "$s"); done
  if [ ! -f "$OUT/$name/model.pt" ]; then
    $tilt finetune -c $config "${common[@]}" --set "finetune.iterations=$ITERATIONS" "${sets[@]}" -o "$OUT/$name" -q
  fi
  [ -f "$OUT/$name/samples_ode.csv" ] ||
    $tilt sample -m "$OUT/$name/model.pt" --noise ode -n "$N" --threads "$THREADS" -o "$OUT/$name/samples_ode.csv"
  if [[ $name == *logp ]]; then logp+=(--samples "$OUT/$name/samples_ode.csv"); else ind+=(--samples "$OUT/$name/samples_ode.csv"); fi
  panels+=("$OUT/$name/samples_ode.csv:$name")
done
# The ink count: its own config ([reward] replaced), RAM and DDPO.
python3 - "$config" "$OUT/ink.toml" "$INK_LAMBDA" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
block = '[reward]\ntype = "ink"\nthreshold = 0.0\nlambda = %s\n\n' % sys.argv[3]
open(sys.argv[2], "w").write(re.sub(r"\[reward\].*?(?=\[finetune\])", block, text, flags=re.S))
PY
for spec in "ink_ram|finetune.method=\"ram\"" "ink_ddpo|finetune.method=\"ddpo\" finetune.grad_clip=1.0"; do
  name=${spec%%|*}
  sets=()
  for s in ${spec#*|}; do sets+=(--set "$s"); done
  [ -f "$OUT/$name/model.pt" ] || $tilt finetune -c "$OUT/ink.toml" --set "threads=$THREADS" --set "base.path=$OUT/base/model.pt" \
    --set "finetune.iterations=$ITERATIONS" "${sets[@]}" -o "$OUT/$name" -q
  [ -f "$OUT/$name/samples_ode.csv" ] ||
    $tilt sample -m "$OUT/$name/model.pt" --noise ode -n "$N" --threads "$THREADS" -o "$OUT/$name/samples_ode.csv"
  panels+=("$OUT/$name/samples_ode.csv:$name")
done
{
  echo "== r = log p(3 | x), lambda = 2 (configs/digits.toml)"
  $tilt eval-images -c $config "${common[@]}" "${logp[@]}" --base "$OUT/base/samples_20k.csv"
  echo
  echo "== r = 1[argmax = 3], lambda = $LAMBDA (no gradient)"
  $tilt eval-images -c $config "${common[@]}" --set 'reward.form="indicator"' --set "reward.lambda=$LAMBDA" "${ind[@]}" \
    --base "$OUT/base/samples_20k.csv"
  echo
  echo "== r = share of pixels > 0 (ink count, no gradient), lambda = $INK_LAMBDA"
  python3 - "$INK_LAMBDA" "$OUT/base/samples_20k.csv" "$OUT/base/samples_ode.csv" "$OUT/ink_ram/samples_ode.csv" \
    "$OUT/ink_ddpo/samples_ode.csv" <<'PY'
import math, sys
lam = float(sys.argv[1])
def shares(path):
    out = []
    for line in open(path):
        cells = line.strip().split(",")
        try:
            x = [float(c) for c in cells]
        except ValueError:
            continue  # the header
        out.append(sum(v > 0 for v in x) / len(x))
    return out
def row(name, r, w=None):
    w = w or [1.0] * len(r)
    s = sum(w); m = sum(wi * ri for wi, ri in zip(w, r)) / s
    var = sum(wi * (ri - m) ** 2 for wi, ri in zip(w, r)) / s
    ess = s * s / sum(wi * wi for wi in w)
    print("%-44s %8.0f %10.4f ± %.4f %10.4f" % (name, ess, m, math.sqrt(var / ess), math.sqrt(var)))
print("%-44s %8s %19s %10s" % ("samples", "n (ESS)", "mean ink share", "its std"))
for path in sys.argv[3:]:
    row(path, shares(path))
base = shares(sys.argv[2])
row("target p* (reweighted base samples)", base, [math.exp(lam * r) for r in base])
PY
} | tee "$OUT/eval_indicator.txt"
$tilt plot --images 8x8 --max-images 50 --columns 5 "${panels[@]}" -o "$OUT/grid_indicator.png" \
  --title "digits: towards class 3 (log p, indicator) and more ink (count), ODE samples"
if [ "${UPDATE_DOCS:-0}" = 1 ]; then
  cp "$OUT/eval_indicator.txt" docs/indicator_eval.txt
  cp "$OUT/grid_indicator.png" docs/images/indicator.png
fi
