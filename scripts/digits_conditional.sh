#!/usr/bin/env bash
# Class-conditional reward fine-tuning on the 8x8 digits (issue 19; the Adjoint Matching paper's Table 5 in
# miniature): pretrains the class-conditional base (c = the one-hot digit, condition dropout for a null
# condition), the reward's classifier and an unseen classifier (another depth, width, seed and input noise,
# never used in training); fine-tunes over all ten classes at once towards r(x, c) = log p(c | x) with Adjoint
# Matching and the baselines under one budget; samples every model with the flow ODE at classifier-free
# guidance w = 0, 1, 4 (post-hoc: the fine-tuned model's null condition is the base's, plus its untrained
# residual); evaluates each class at its own class (share, log p(c|x), diversity, Frechet) and under the unseen
# classifier, and draws one grid per w with a row per digit (docs/conditions.md, "The class-conditional digits").
#   scripts/digits_conditional.sh                # ~30 min on 2 cores with THREADS=1; runs in runs/digits_cond,
#                                                # skips finished runs and existing sample files
#   UPDATE_DOCS=1 scripts/digits_conditional.sh  # also refreshes docs/digits_conditional_eval.txt and
#                                                # docs/images/digits_conditional_w{0,1,4}.png
# Environment: OUT (runs/digits_cond), THREADS (0: all cores), PRETRAIN_ITERATIONS (30000:
# scripts/digits_cond_settings.sh), ITERATIONS (1000), N (1000 samples per class and guidance weight).
#   STUDY=unet scripts/digits_conditional.sh    the same with a class-conditional U-Net (configs/digits_unet.toml,
#       docs/equations.md E124) fine-tuned by Adjoint Matching three ways at one budget: LoRA adapters (E125), a full
#       copy and a residual U-Net (batch 32, K = 20; PRETRAIN_ITERATIONS 6000, ITERATIONS 400 by default), into
#       runs/digits_unet; UPDATE_DOCS=1 writes docs/digits_unet_eval.txt and docs/images/digits_unet_w0.png.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh -DTILT_BUILD_APPS=ON

STUDY=${STUDY:-methods}
. scripts/digits_cond_settings.sh
case "$STUDY" in
  methods) name_=digits_conditional; config=configs/digits_conditional.toml; guidance=(0 1 4)
           pretrain_default=$digits_cond_pretrain_iterations
           iterations_default=1000; out_default=runs/digits_cond ;;
  unet) name_=digits_unet; config=configs/digits_unet.toml; guidance=(0); pretrain_default=6000
        iterations_default=400; out_default=runs/digits_unet ;;
  *) echo "digits_conditional: STUDY must be methods or unet, got '$STUDY'" >&2; exit 2 ;;
esac
OUT=${OUT:-$out_default}
THREADS=${THREADS:-0}
PRETRAIN_ITERATIONS=${PRETRAIN_ITERATIONS:-$pretrain_default}
ITERATIONS=${ITERATIONS:-$iterations_default}
N=${N:-1000}
tilt=build/bin/tilt
common=(--set "threads=$THREADS" --set "base.path=$OUT/base/model.pt"
        --set "reward.path=$OUT/classifier/classifier.pt")

. scripts/timed.sh   # timed DIR COMMAND...: its seconds and peak memory into DIR

[ -f "$OUT/base/model.pt" ] || timed "$OUT/base" $tilt pretrain -c $config --set "threads=$THREADS" \
  --set "pretrain.iterations=$PRETRAIN_ITERATIONS" -o "$OUT/base" ${TILT_QUIET:+-q}
[ -f "$OUT/classifier/classifier.pt" ] ||
  timed "$OUT/classifier" $tilt classifier -c $config --set "threads=$THREADS" -o "$OUT/classifier" ${TILT_QUIET:+-q}
# The unseen reward: another architecture (one hidden layer of 512 with ReLU instead of [256, 64] with SiLU),
# another seed (so another held-out split and initialisation), less input noise and a larger learning rate.
# Only the evaluation reads it.
[ -f "$OUT/unseen/classifier.pt" ] ||
  timed "$OUT/unseen" $tilt classifier -c $config --set "threads=$THREADS" --set seed=1 --set "classifier.hidden=[512]" \
    --set 'classifier.activation="relu"' --set classifier.input_noise=0.1 --set classifier.lr=2e-3 -o "$OUT/unseen" \
    ${TILT_QUIET:+-q}

# name | settings (the rest is configs/digits_conditional.toml's [finetune]); the baselines as in digits.sh.
if [ "$STUDY" = unet ]; then
  # One budget (iterations, batch 32, K = 20) for the three ways of training a U-Net; each mode's own learning rate
  # (a full copy moves every weight: 2e-4; the adapters and the zero-started residual: 1e-3).
  unet_budget="finetune.batch_size=32 finetune.num_steps=20 finetune.adjoint_matching.loss_early_steps=5"
  unet_budget+=" finetune.adjoint_matching.loss_late_steps=5"
  runs=(
    "am_lora|finetune.model=\"lora\" $unet_budget"
    "am_copy|finetune.model=\"copy\" finetune.lr=2e-4 $unet_budget"
    "am_residual|finetune.model=\"residual\" $unet_budget"
  )
else
  runs=(
    "am|finetune.method=\"adjoint_matching\""
    "discrete_adjoint|finetune.method=\"discrete_adjoint\""
    "draft1|finetune.method=\"draft\" finetune.draft.draft_k=1"
    "ddpo|finetune.method=\"ddpo\" finetune.grad_clip=1.0"
    # DRaFT has no KL term: at Adjoint Matching's lr it hacks the reward (Frechet 20x the base's at w = 0);
    # one lower lr, as digits.sh's *_lr rows. Not in the grids.
    "draft1_lr1e-4|finetune.method=\"draft\" finetune.draft.draft_k=1 finetune.lr=1e-4"
  )
fi
models=(base)
for spec in "${runs[@]}"; do
  name=${spec%%|*}
  sets=()
  for s in ${spec#*|}; do sets+=(--set "$s"); done
  [ -f "$OUT/$name/model.pt" ] || timed "$OUT/$name" $tilt finetune -c $config "${common[@]}" \
    --set "finetune.iterations=$ITERATIONS" "${sets[@]}" -o "$OUT/$name" ${TILT_QUIET:+-q}
  models+=("$name")
done

# N samples at each of the ten classes, the flow ODE, each guidance weight; the same seed for every model.
args=()
for w in "${guidance[@]}"; do
  panels=()
  for name in "${models[@]}"; do
    file="$OUT/$name/samples_w$w.csv"
    [ -f "$file" ] || $tilt sample -m "$OUT/$name/model.pt" --noise ode -n "$N" --guidance "$w" --seed 1 \
      --threads "$THREADS" -o "$file"
    args+=(--samples "$file")
    [[ $name == *_lr* ]] || panels+=("$file:$name")
  done
  $tilt plot --images 8x8 --by-condition 8 --columns 5 "${panels[@]}" -o "$OUT/grid_w$w.png" \
    --title "class-conditional digits, one row per class: guidance w = $w, sampled with the ODE"
done

# The target p*(x | c) ∝ p_base(x | c) p(c | x) of each class, for reference: the base's samples at w = 0
# reweighted by p(c | x)^lambda within their class.
$tilt eval-images -c $config "${common[@]}" "${args[@]}" --base "$OUT/base/samples_w0.csv" \
  --unseen "$OUT/unseen/classifier.pt" > "$OUT/eval.txt"
{
  echo "# STUDY=$STUDY scripts/digits_conditional.sh ($config): the class-conditional digits (docs/conditions.md), $N samples per class,"
  echo "# the flow ODE (100 steps), guidance w = ${guidance[*]}; fine-tuning $ITERATIONS iterations, pretraining"
  echo "# $PRETRAIN_ITERATIONS. Wall-clock seconds (THREADS=$THREADS):"
  for name in base classifier unseen "${models[@]:1}"; do
    if [ -f "$OUT/$name/seconds.txt" ]; then
      echo "#   $name: $(cat "$OUT/$name/seconds.txt") s$([ -f "$OUT/$name/max_rss_kb.txt" ] &&
        echo ", peak resident memory $(($(cat "$OUT/$name/max_rss_kb.txt") / 1024)) MB")"
    fi
  done
  echo
  cat "$OUT/eval.txt"
} > "$OUT/eval_report.txt"
cat "$OUT/eval_report.txt"
if [ "${UPDATE_DOCS:-0}" = 1 ]; then
  cp "$OUT/eval_report.txt" "docs/${name_}_eval.txt"
  for w in "${guidance[@]}"; do cp "$OUT/grid_w$w.png" "docs/images/${name_}_w$w.png"; done
fi
