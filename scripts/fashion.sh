#!/usr/bin/env bash
# The Adjoint Matching paper's table in miniature on Fashion-MNIST (issue 20; the paper's Table 2 setting with a
# class-conditional U-Net for the text-conditional image model and the ten classes for the prompts):
#   - pretrains the class-conditional U-Net of configs/fashion_unet.toml (1.25M parameters, flow matching with
#     condition dropout), the reward's CNN classifier and an unseen MLP classifier (another architecture, seed and
#     input noise; only the evaluation reads it);
#   - fine-tunes LoRA adapters over all ten classes at once towards r(x, c) = log p(c | x), at lambda = 1 and 5, with
#     Adjoint Matching (memoryless), Adjoint Matching with sigma = 1 (a biased schedule), the discrete adjoint, DRaFT-1,
#     ReFL and DDPO, all at one budget (iterations, batch, K); at lambda = 1 also a full copy instead of LoRA (the
#     equal-budget comparison) and Adjoint Matching towards a reward of another kind (brightness: the mean pixel);
#   - samples each model with the flow ODE at every class, scores each class at its own class (log p(c | x), share,
#     pixel and feature diversity, Frechet distance in the classifier's features) and under the unseen classifier,
#     and writes the table (scripts/fashion_table.py) and one grid per lambda, a row per class.
# DRaFT, ReFL and DDPO have no KL term; the lambda only scales their reward (DDPO standardises it away, Adam nearly
# so for DRaFT and ReFL), so they run once and appear under both lambdas.
#   scripts/fashion.sh                 # hours on 2 cores (the pretraining 50-90 min); skips finished runs and samples,
#                                      # and a run killed mid-way resumes from its last checkpoint
#   UPDATE_DOCS=1 scripts/fashion.sh   # also writes docs/fashion.md and docs/images/fashion_lambda{1,5}.png
#   TINY=1 OUT=/tmp/f scripts/fashion.sh   # the same code on a tiny U-Net and 2000 images in ~40 s (ctest fashion)
#   PRETRAIN_ONLY=1 scripts/fashion.sh     # only the base and the two classifiers (scripts/fashion_long.sh uses them)
# Environment: OUT (runs/fashion), THREADS (0: all cores), PRETRAIN_ITERATIONS (6000), ITERATIONS (200), N (50
# samples per class), STEPS (25) and INTEGRATOR (heun) of the ODE sampler, LAMBDAS ("1 5"), NO_BUILD=1 (use the tilt
# binary as it is), TILT (build/bin/tilt).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${NO_BUILD:-0}" != 1 ]; then
  scripts/setup.sh
  scripts/build.sh -DTILT_BUILD_APPS=ON
fi

OUT=${OUT:-runs/fashion}
. scripts/fashion_settings.sh
if [ "$TINY" = 1 ]; then
  PRETRAIN_ITERATIONS=${PRETRAIN_ITERATIONS:-3}; ITERATIONS=${ITERATIONS:-2}
else
  PRETRAIN_ITERATIONS=${PRETRAIN_ITERATIONS:-6000}; ITERATIONS=${ITERATIONS:-200}
fi
LAMBDAS=${LAMBDAS:-1 5}
mkdir -p "$OUT"
common=(--set "threads=$THREADS" --set "base.path=$OUT/base/model.pt" "${tiny[@]}")
classifier=(--set "reward.path=$OUT/classifier/classifier.pt")
# without SECTION KEY...: configs/fashion_unet.toml without these keys of [SECTION], on stdout.
without() {
  local section=$1 key script=""
  shift
  for key in "$@"; do script+="/^$key *=/d;"; done
  sed -e "/^\\[$section\\]/,/^\\[/{$script}" "$config"
}
bright_config=$OUT/fashion_bright.toml   # the brightness reward takes no classifier file and no class
without reward path class > "$bright_config"
unseen_config=$OUT/fashion_unseen.toml   # an MLP classifier has no convolution channels
without classifier channels > "$unseen_config"
if [ ! -f "$OUT/base/model.pt" ]; then
  resume_or_clear "$OUT/base"
  timed "$OUT/base" $tilt pretrain -c $config "${common[@]}" --set "pretrain.iterations=$PRETRAIN_ITERATIONS" \
    -o "$OUT/base" "${resume[@]}" $quiet
fi
if [ ! -f "$OUT/classifier/classifier.pt" ]; then
  resume_or_clear "$OUT/classifier"
  timed "$OUT/classifier" $tilt classifier -c $config "${common[@]}" -o "$OUT/classifier" "${resume[@]}" $quiet
fi
# The unseen classifier: an MLP (one hidden layer of 512, ReLU) where the reward's is a CNN, another seed (another
# held-out split and initialisation), less input noise, a larger learning rate.
if [ ! -f "$OUT/unseen/classifier.pt" ]; then
  resume_or_clear "$OUT/unseen"
  timed "$OUT/unseen" $tilt classifier -c "$unseen_config" "${common[@]}" --set seed=1 \
    --set 'classifier.architecture="mlp"' --set "classifier.hidden=[512]" --set 'classifier.activation="relu"' \
    --set classifier.input_noise=0.1 --set classifier.lr=2e-3 -o "$OUT/unseen" "${resume[@]}" $quiet
fi
if [ "${PRETRAIN_ONLY:-0}" = 1 ]; then
  echo "$OUT/base/model.pt, $OUT/classifier/classifier.pt and $OUT/unseen/classifier.pt are ready"
  exit 0
fi

# name | settings beyond configs/fashion_unet.toml's [finetune] (LoRA, batch 16, K = 10, lr 1e-3).
runs=()
for l in $LAMBDAS; do
  runs+=("am_l$l|reward.lambda=$l"
         "am_sigma1_l$l|reward.lambda=$l finetune.noise=\"constant:1\""
         "discrete_adjoint_l$l|reward.lambda=$l finetune.method=\"discrete_adjoint\"")
done
runs+=("draft1|finetune.method=\"draft\" finetune.draft.draft_k=1"
       "refl|finetune.method=\"refl\""
       "ddpo|finetune.method=\"ddpo\" finetune.grad_clip=1.0"
       # Equal budget, every weight trained: a full copy moves every weight, so a smaller lr (as the digits U-Net's).
       "am_copy_l1|reward.lambda=1 finetune.model=\"copy\" finetune.lr=2e-4"
       # A reward of another kind: the mean pixel (brightness, in [-1, 1]). Over the base's samples its class means go
       # from -0.70 (sandals) to -0.23 (coats) and its sd is 0.25, so lambda = 10 tilts by a few units.
       "am_bright|reward.type=\"ink\" reward.lambda=10")
models=(base)
for spec in "${runs[@]}"; do
  name=${spec%%|*}
  sets=()
  for s in ${spec#*|}; do sets+=(--set "$s"); done
  # The ink reward has no classifier file and takes no class.
  if [ "$name" = am_bright ]; then run_config=(-c "$bright_config"); else run_config=(-c $config "${classifier[@]}"); fi
  if [ ! -f "$OUT/$name/model.pt" ]; then
    resume_or_clear "$OUT/$name"
    timed "$OUT/$name" $tilt finetune "${run_config[@]}" "${common[@]}" --set "finetune.iterations=$ITERATIONS" \
      "${sets[@]}" -o "$OUT/$name" "${resume[@]}" $quiet
  fi
  models+=("$name")
done

# Every model sampled with the same sampler and seed (sample, in scripts/fashion_settings.sh).
for name in "${models[@]}"; do sample "$OUT/$name/model.pt" "$OUT/$name/$samples"; done

# Per lambda: the table's rows scored together, with the target p* (base samples reweighted by p(c | x)^lambda).
evals=()
for l in $LAMBDAS; do
  args=(--samples "$OUT/base/$samples")
  panels=("$OUT/base/$samples:base")
  for name in am_l$l am_sigma1_l$l discrete_adjoint_l$l draft1 refl ddpo; do
    args+=(--samples "$OUT/$name/$samples")
    panels+=("$OUT/$name/$samples:$name")
  done
  if [ "$l" = 1 ]; then
    for name in am_copy_l1 am_bright; do args+=(--samples "$OUT/$name/$samples"); done
  fi
  $tilt eval-images -c $config "${common[@]}" "${classifier[@]}" --set "reward.lambda=$l" "${args[@]}" \
    --base "$OUT/base/$samples" --unseen "$OUT/unseen/classifier.pt" --json-file "$OUT/eval_l$l.json" \
    > "$OUT/eval_l$l.txt"
  $tilt plot --images 28x28 --by-condition 6 --columns 4 "${panels[@]}" -o "$OUT/grid_l$l.png" \
    --title "Fashion-MNIST, one row per class: lambda = $l, sampled with the ODE"
  evals+=("$l=$OUT/eval_l$l.json")
done
python3 scripts/fashion_table.py --out "$OUT" --iterations "$ITERATIONS" --n "$N" --samples "$samples" --steps "$STEPS" \
  --integrator "$INTEGRATOR" --threads "$THREADS" "${evals[@]}" \
  > "$OUT/fashion.md"
cat "$OUT/fashion.md"
if [ "${UPDATE_DOCS:-0}" = 1 ]; then
  cp "$OUT/fashion.md" docs/fashion.md
  for l in $LAMBDAS; do cp "$OUT/grid_l$l.png" "docs/images/fashion_lambda$l.png"; done
  for l in $LAMBDAS; do cp "$OUT/eval_l$l.txt" "docs/fashion_eval_l$l.txt"; done
fi
