#!/usr/bin/env bash
# Fashion-MNIST at longer budgets (issue 20): scripts/fashion.sh fine-tunes every method for 200 iterations, where
# Adjoint Matching covers a fifth of the way to p*. This script trains Adjoint Matching's runs on, in stages, and
# scores each stage's model, to show how far along the way each run gets and whether the biased sigma = 1 schedule
# parts from the memoryless one:
#   - reuses scripts/fashion.sh's base U-Net and classifiers in FASHION (made there first when missing:
#     PRETRAIN_ONLY=1 scripts/fashion.sh, 50-90 min on 2 cores);
#   - per run of RUNS, at lambda = LAMBDA, one `tilt finetune` run trained to each budget of BUDGETS in turn, each
#     stage resuming the last (`--resume` with more iterations) at a constant learning rate, so that the model of a
#     stage is exactly the model a run of that length would give (the test checks this byte for byte); each stage's
#     model is kept as <run>/model_<iterations>.pt and sampled with the flow ODE at every class;
#   - samples the base also with the memoryless chains the runs train on (CHAINS: Euler-Maruyama or the exact step,
#     K steps), to show how far a K-step chain's terminal law is from the base's;
#   - scores every stage, the base (and its chains) and the target p* (base samples reweighted by
#     p(c | x)^lambda) together with `tilt eval-images`, writes the table ($OUT/fashion_long.md; the share of the
#     way from the base's log p(c | x) to the target's is its own column) and a grid of the base and each run's
#     last stage ($OUT/grid.png).
# Runs: am (memoryless, LoRA rank 4, lr 1e-3), am_sigma1 (sigma = 1, a biased schedule), am_copy (a full copy,
# lr 2e-4), am_cosine (am with the lr decayed from 1e-3 to 1e-5 along a cosine: one budget only, as its stages would
# not be runs of their own length), am_batch32 (am with 32 samples per iteration), am_k20 (am on 20 time steps with
# 6 + 6 loss steps, the same share of the steps: twice the work of an iteration), am_k40 (40 steps, 12 + 12 in the
# loss: four times the work), am_exact (am trained on the exact gDDIM step's chain, its rollout and lean adjoint, with
# the paper's target), discrete_adjoint; and each of them as <run>_seed<N>, trained from seed N. A run killed
# mid-stage resumes from its last checkpoint when the script is started again; finished stages are skipped. Two
# cores: one instance per run on one thread each finishes sooner, once the base and classifiers exist (two instances
# would both start the pretraining, and the second stop), e.g.
#   PRETRAIN_ONLY=1 scripts/fashion.sh
#   RUNS=am THREADS=1 NO_BUILD=1 scripts/fashion_long.sh & RUNS=am_sigma1 THREADS=1 NO_BUILD=1 scripts/fashion_long.sh &
# (each scores whatever stages exist when it ends: run the script once more at the end for the whole table).
#   UPDATE_DOCS=1 scripts/fashion_long.sh   # also writes docs/fashion_long.md and docs/images/fashion_long.png
#   TINY=1 OUT=/tmp/l scripts/fashion_long.sh   # a tiny U-Net and 2000 images, budgets 2 10 (ctest fashion)
# Environment: FASHION (runs/fashion; TINY: $OUT/fashion), OUT (runs/fashion_long), RUNS ("am am_sigma1"), LAMBDA (5),
# BUDGETS ("200 500 1000 2000"), CHAINS (the base's chain rows: "euler10 euler20 euler40 exact10"; TINY: euler4),
# THREADS (0: all cores), N, STEPS, INTEGRATOR (the sampler, as scripts/fashion.sh), NO_BUILD=1, TILT (build/bin/tilt).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/fashion_long}
. scripts/fashion_settings.sh
if [ "$TINY" = 1 ]; then
  FASHION=${FASHION:-$OUT/fashion}; BUDGETS=${BUDGETS:-2 10}; CHAINS=${CHAINS:-euler4}
else
  BUDGETS=${BUDGETS:-200 500 1000 2000}; CHAINS=${CHAINS:-euler10 euler20 euler40 exact10}
fi
FASHION=${FASHION:-runs/fashion}
RUNS=${RUNS:-am am_sigma1}
LAMBDA=${LAMBDA:-5}

# The settings of a run beyond configs/fashion_unet.toml's [finetune] (LoRA rank 4, batch 16, K = 10, lr 1e-3), after
# a constant learning rate.
# A run name may end in _seedN (am_seed1, am_k20_seed2): the run with the top-level seed N (the network's
# initialisation and every iteration's draws; sampling keeps its own seed), to see how much a row owes to training
# noise.
known_runs="am am_sigma1 am_copy am_cosine am_batch32 am_k20 am_k40 am_exact discrete_adjoint"
run_settings() {
  local name=$1 seed=""
  if [[ $name =~ ^(.+)_seed([0-9]+)$ ]]; then
    name=${BASH_REMATCH[1]}; seed=${BASH_REMATCH[2]}
  fi
  case $name in
    am) echo "" ;;
    am_sigma1) echo 'finetune.noise="constant:1"' ;;
    am_copy) echo 'finetune.model="copy" finetune.lr=2e-4' ;;
    am_cosine) echo 'finetune.lr_schedule="cosine"' ;;
    am_batch32) echo 'finetune.batch_size=32' ;;
    am_k20) echo 'finetune.num_steps=20 finetune.adjoint_matching.loss_early_steps=6' \
      'finetune.adjoint_matching.loss_late_steps=6' ;;
    am_k40) echo 'finetune.num_steps=40 finetune.adjoint_matching.loss_early_steps=12' \
      'finetune.adjoint_matching.loss_late_steps=12' ;;
    am_exact) echo 'finetune.adjoint_matching.integrator="exact"' ;;
    discrete_adjoint) echo 'finetune.method="discrete_adjoint"' ;;
    *) echo "RUNS: unknown run '$1' (known: $known_runs, each also as <run>_seed<N>)" >&2; return 1 ;;
  esac
  [ -z "$seed" ] || echo "seed=$seed"
}
for name in $RUNS; do run_settings "$name" > /dev/null; done
previous=0
for b in $BUDGETS; do
  if ! [[ $b =~ ^[0-9]+$ ]] || [ "$b" -le "$previous" ]; then
    echo "BUDGETS: '$BUDGETS' must be increasing positive iteration counts" >&2
    exit 1
  fi
  previous=$b
done
chain_form='^(euler|exact)([1-9][0-9]*)$'   # a chain of CHAINS: its step and its number of steps
for chain in $CHAINS; do
  if ! [[ $chain =~ $chain_form ]]; then
    echo "CHAINS: '$chain' is not euler<K> or exact<K> (the memoryless chain's step and its number of steps)" >&2
    exit 1
  fi
done
# A decaying lr depends on the run's length: a stage resumed with more iterations would follow another curve than a
# run of that length, so such a run trains to one budget.
for name in $RUNS; do
  if [[ $(run_settings "$name") == *lr_schedule* ]] && [ "$(echo $BUDGETS | wc -w)" != 1 ]; then
    echo "RUNS: $name decays its learning rate over the whole run, so it takes one budget (e.g. BUDGETS=1000)," \
      "not '$BUDGETS'" >&2
    exit 1
  fi
done

# The base and the two classifiers, made by scripts/fashion.sh where missing (it also builds, unless NO_BUILD=1).
OUT=$FASHION PRETRAIN_ONLY=1 scripts/fashion.sh
common=(--set "threads=$THREADS" --set "base.path=$FASHION/base/model.pt" "${tiny[@]}")
classifier=(--set "reward.path=$FASHION/classifier/classifier.pt")
mkdir -p "$OUT/base"

sample "$FASHION/base/model.pt" "$OUT/base/$samples"
# The base sampled with the chains the runs train on: the memoryless SDE in K steps of Euler-Maruyama (a run's
# rollouts, finetune.num_steps = K) or of the exact step, N per class, scored beside the ODE's samples: how far a
# training chain's own terminal law lies from the base's.
chain_files=()
for chain in $CHAINS; do
  [[ $chain =~ $chain_form ]]
  f=$OUT/base/chain_${chain}_n$N.csv
  chain_files+=(--samples "$f")
  [ -f "$f" ] || $tilt sample -m "$FASHION/base/model.pt" --noise memoryless -n "$N" --steps "${BASH_REMATCH[2]}" \
    --integrator "${BASH_REMATCH[1]}" --seed 1 --threads "$THREADS" -o "$f" $quiet
done

for name in $RUNS; do
  dir=$OUT/$name
  sets=(--set "reward.lambda=$LAMBDA" --set 'finetune.lr_schedule="constant"')
  for s in $(run_settings "$name"); do sets+=(--set "$s"); done
  for b in $BUDGETS; do
    if [ ! -f "$dir/model_$b.pt" ]; then
      if [ ! -f "$dir/checkpoint.pt" ] && compgen -G "$dir/model_*.pt" > /dev/null; then
        echo "$dir has stages but no checkpoint.pt to go on from; move it away to start $name again" >&2
        exit 1
      fi
      resume_or_clear "$dir"
      echo "$(date -u +%FT%TZ) $name: training to $b iterations"
      timed "$dir" $tilt finetune -c $config "${common[@]}" "${classifier[@]}" "${sets[@]}" \
        --set "finetune.iterations=$b" -o "$dir" "${resume[@]}" $quiet
      cp "$dir/model.pt" "$dir/model_$b.pt.tmp" && mv "$dir/model_$b.pt.tmp" "$dir/model_$b.pt"
    fi
    sample "$dir/model_$b.pt" "$dir/${b}_$samples"
  done
done

# Every stage sampled so far, of every run (also those another instance trains, and every seed), scored together;
# the grid shows the runs of seed 0.
args=(--samples "$OUT/base/$samples")
args+=("${chain_files[@]}")
panels=("$OUT/base/$samples:base")
scored=""
for name in $known_runs; do
  scored+=" $name"
  for d in "$OUT/${name}"_seed*; do
    [[ -d $d && $(basename "$d") =~ ^${name}_seed[0-9]+$ ]] && scored+=" $(basename "$d")"
  done
done
for name in $scored; do
  most=0
  for f in "$OUT/$name"/*_"$samples"; do
    b=$(basename "$f" "_$samples")
    [ -f "$f" ] && [[ $b =~ ^[0-9]+$ ]] || continue
    args+=(--samples "$f")
    # The glob sorts 1000 before 200: the grid shows the stage of most iterations, compared as numbers.
    [ "$b" -le "$most" ] || most=$b
  done
  [ "$most" = 0 ] || [[ $name == *_seed* ]] || panels+=("$OUT/$name/${most}_$samples:$name, $most iterations")
done
printf 'grid panels: %s\n' "$(IFS=';'; echo "${panels[*]##*:}")"
$tilt eval-images -c $config "${common[@]}" "${classifier[@]}" --set "reward.lambda=$LAMBDA" "${args[@]}" \
  --base "$OUT/base/$samples" --unseen "$FASHION/unseen/classifier.pt" --json-file "$OUT/eval.json" > "$OUT/eval.txt"
$tilt plot --images 28x28 --by-condition 6 --columns ${#panels[@]} "${panels[@]}" -o "$OUT/grid.png" \
  --title "Fashion-MNIST at lambda = $LAMBDA: the base and each run's last stage, sampled with the ODE"
python3 scripts/fashion_long_table.py "$OUT" "$samples" "$LAMBDA" "$N" "$STEPS" "$INTEGRATOR" "$THREADS" \
  > "$OUT/fashion_long.md"
cat "$OUT/fashion_long.md"
if [ "${UPDATE_DOCS:-0}" = 1 ]; then
  cp "$OUT/fashion_long.md" docs/fashion_long.md
  cp "$OUT/grid.png" docs/images/fashion_long.png
fi
