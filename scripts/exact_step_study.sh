#!/usr/bin/env bash
# Adjoint Matching on the exact step's chain against Euler's (finetune.adjoint_matching.integrator, docs/equations.md,
# E135), on the 2-D demo problem (configs/demo_2d.toml: 8 Gaussians on a ring, a quadratic reward, exact p*) at
# coarse grids K. Each run is the demo's settings with K steps (the loss on K/2 drawn + K/3 last steps) and ITERATIONS
# iterations, from SEEDS training seeds, with the paper's target and, at K = 20, the chain target too; each model is
# sampled with the flow ODE (Heun, 100 steps) and with the memoryless SDE by the exact step (100 steps), and scored
# against exact p* by `tilt eval` (energy distance over its noise floor; mean reward, the target's is printed).
# Writes $OUT/table.md; UPDATE_DOCS=1 copies it to docs/exact_step.md.
# Options (environment): OUT=runs/exact_step_study  KS="10 20 40"  SEEDS="0 1 2"  ITERATIONS=1000  N=4000
#   THREADS=1  NO_BUILD=1 (use TILT, default build/bin/tilt, as it is)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${NO_BUILD:-0}" = 1 ] || scripts/build.sh -DTILT_BUILD_APPS=ON >/dev/null
tilt=${TILT:-build/bin/tilt}
config=configs/demo_2d.toml
out=${OUT:-runs/exact_step_study}
ks=${KS:-10 20 40}
seeds=${SEEDS:-0 1 2}
iterations=${ITERATIONS:-1000}
n=${N:-4000}
threads=${THREADS:-1}
for k in $ks; do
  if ! [[ $k =~ ^[0-9]+$ ]] || [ "$k" -lt 6 ]; then echo "KS: '$k' is not a grid of at least 6 steps" >&2; exit 2; fi
done
for s in $seeds; do [[ $s =~ ^[0-9]+$ ]] || { echo "SEEDS: '$s' is not a seed (a number >= 0)" >&2; exit 2; }; done
mkdir -p "$out"

# One run: name, K, integrator, target, seed. Trains (unless its model exists), samples both ways, scores.
run() {
  local name=$1 k=$2 integrator=$3 target=$4 seed=$5
  local dir="$out/$name"
  if [ ! -f "$dir/model.pt" ]; then
    rm -rf "$dir"
    echo "exact_step_study: $name" >&2
    "$tilt" finetune -q -c "$config" --set threads="$threads" --set seed="$seed" --set finetune.num_steps="$k" \
      --set finetune.iterations="$iterations" --set finetune.adjoint_matching.loss_early_steps=$((k / 2)) \
      --set finetune.adjoint_matching.loss_late_steps=$((k / 3)) \
      --set finetune.adjoint_matching.integrator=\""$integrator"\" --set finetune.adjoint_matching.target=\""$target"\" \
      -o "$dir" > "$dir.log" 2>&1 || { echo "exact_step_study: $name failed, see $dir.log" >&2; exit 1; }
  fi
  "$tilt" sample -q -m "$dir/model.pt" --noise ode --steps 100 -n "$n" --seed 1 --threads "$threads" -o "$dir/ode.csv"
  "$tilt" sample -q -m "$dir/model.pt" --noise memoryless --integrator exact --steps 100 -n "$n" --seed 1 \
    --threads "$threads" -o "$dir/sde.csv"
  "$tilt" eval -c "$config" -s "$dir/ode.csv" -s "$dir/sde.csv" --threads "$threads" --json > "$dir/eval.json" 2>/dev/null
  echo "$name $k $integrator $target $seed" >> "$out/runs.txt"
}

: > "$out/runs.txt"
for k in $ks; do
  for seed in $seeds; do
    run "k${k}_euler_s$seed" "$k" euler continuous "$seed"
    run "k${k}_exact_s$seed" "$k" exact continuous "$seed"
    [ "$k" != 20 ] || run "k${k}_exact_chain_s$seed" "$k" exact chain "$seed"
  done
done

python3 - "$out" "$iterations" "$n" > "$out/table.md" <<'PY'
import json, sys, statistics
out, iterations, n = sys.argv[1], sys.argv[2], sys.argv[3]
rows = {}
target_reward = None
for line in open(f"{out}/runs.txt"):
    name, k, integrator, target, seed = line.split()
    e = json.load(open(f"{out}/{name}/eval.json"))
    target_reward = e["target"]["mean_reward"]
    s = e["samples"]
    key = (int(k), integrator, target)
    rows.setdefault(key, []).append((s[f"{out}/{name}/ode.csv"], s[f"{out}/{name}/sde.csv"]))
def cell(values, fmt):
    return " / ".join(fmt % v for v in values)
print(f"Adjoint Matching on the 2-D demo (configs/demo_2d.toml), {iterations} iterations, the K-step chain of each row;")
print(f"each model sampled with the ODE (Heun, 100 steps) and the memoryless SDE (exact step, 100 steps), {n} samples,")
print("scored against exact p* by `tilt eval`. Energy distance over its noise floor (1 = as close as a second exact")
print(f"sample), one value per training seed; mean reward (p*: {target_reward:.3f}). Command: scripts/exact_step_study.sh\n")
print("| K | training chain | target | ODE: energy distance / floor | memoryless SDE: the same | ODE: mean reward |")
print("|---|---|---|---|---|---|")
for (k, integrator, target), runs in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1] != "euler", kv[0][2] != "continuous")):
    chain = "Euler-Maruyama" if integrator == "euler" else "exact step"
    ode = [r[0]["energy_distance_ratio"] for r in runs]
    sde = [r[1]["energy_distance_ratio"] for r in runs]
    rew = [r[0]["mean_reward"] for r in runs]
    print(f"| {k} | {chain} | {target} | {cell(ode, '%.2f')} (median {statistics.median(ode):.2f}) | "
          f"{cell(sde, '%.2f')} (median {statistics.median(sde):.2f}) | {cell(rew, '%.3f')} |")
PY
cat "$out/table.md"
if [ "${UPDATE_DOCS:-0}" = 1 ]; then
  { echo "# Adjoint Matching on the exact step's chain"; echo; cat "$out/table.md"; } > docs/exact_step.md
fi
