#!/usr/bin/env bash
# Issue 6 (part): sampling with tunable stochasticity, and log Z / importance weights, on the 2-D demo.
#
# 1. A model fine-tuned with the memoryless schedule (configs/demo_2d.toml; reused from scripts/demo.sh
#    when runs/demo/memoryless/model.pt exists, else fine-tuned here, ~4 min) and, for contrast, one
#    fine-tuned with constant sigma = 1 (biased), each sampled with the exact gDDIM step at gamma =
#    0 (ODE), 0.25, 0.5, 1 (memoryless), 2, 4: mean reward, reward gap to the ODE, energy distance to
#    exact p*.
# 2. log Z of the demo's tilt by `tilt logz` for several proposals and methods, against the exact value.
# Writes $OUT/study.md (both tables) and $OUT/stochasticity.png; UPDATE_DOCS=1 copies them into docs/.
# Options (environment): OUT=runs/study  N=4000 samples per row  STEPS=200  PATHS=20000 (log Z)
#   MODEL=<memoryless model.pt>  MODEL_SIGMA1=<constant-sigma-1 model.pt>  THREADS=1
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh -DTILT_BUILD_APPS=ON >/dev/null

tilt=build/bin/tilt
config=configs/demo_2d.toml
out=${OUT:-runs/study}
n=${N:-4000}
steps=${STEPS:-200}
paths=${PATHS:-20000}
threads=${THREADS:-1}
mkdir -p "$out"

model_for() {  # name noise [given path]
  local given=${3:-} dir="runs/demo/$1"
  if [ -n "$given" ]; then echo "$given"; return; fi
  if [ ! -f "$dir/model.pt" ]; then
    echo "study: fine-tuning $dir (noise $2)" >&2
    if [ -f "$dir/checkpoint.pt" ]; then resume=--resume; else resume=; fi
    "$tilt" finetune -c "$config" --set finetune.noise="$2" --set threads="$threads" -o "$dir" $resume >&2
  fi
  echo "$dir/model.pt"
}
memoryless=$(model_for memoryless memoryless "${MODEL:-}")
sigma1=$(model_for sigma_1 constant:1.0 "${MODEL_SIGMA1:-}")

gammas=(0 0.25 0.5 1 2 4)
samples=()
for g in "${gammas[@]}"; do
  noise=scaled_memoryless:$g
  [ "$g" = 0 ] && noise=ode
  for m in memoryless sigma1; do
    file="$out/${m}_gamma_$g.csv"
    "$tilt" sample -m "${!m}" -n "$n" --noise "$noise" --integrator exact --steps "$steps" --seed 1 \
      --threads "$threads" -o "$file" 2>/dev/null
    samples+=(-s "$file")
  done
done
"$tilt" sample --exact target -c "$config" -n "$n" --seed 1 -o "$out/target.csv" 2>/dev/null
samples+=(-s "$out/target.csv")
"$tilt" eval -c "$config" --set threads="$threads" "${samples[@]}" --json > "$out/eval.json"

"$tilt" plot -o "$out/stochasticity.png" --columns 4 --size 240 \
  --title "Fine-tuned models sampled with the exact gDDIM step at stochasticity gamma" \
  "$out/memoryless_gamma_0.csv:memoryless, ODE" "$out/memoryless_gamma_0.5.csv:memoryless, gamma 0.5" \
  "$out/memoryless_gamma_1.csv:memoryless, gamma 1" "$out/memoryless_gamma_4.csv:memoryless, gamma 4" \
  "$out/sigma1_gamma_0.csv:sigma = 1, ODE" "$out/sigma1_gamma_1.csv:sigma = 1, gamma 1" \
  "$out/sigma1_gamma_4.csv:sigma = 1, gamma 4" "$out/target.csv:exact p*" 2>/dev/null

logz_runs=(
  "girsanov zero --control zero --integrator exact"
  "girsanov u*x0.5 --control optimal:0.5 --integrator exact"
  "girsanov u* --control optimal --integrator exact"
  "girsanov u*x2 --control optimal:2 --integrator exact"
  "girsanov fine-tuned --model $memoryless --integrator exact"
  "noising zero --control zero --integrator euler"
  "noising u* --control optimal --integrator euler"
  "noising fine-tuned --model $memoryless --integrator euler"
  "jarzynski sigma=0 --noise ode"
  "jarzynski sigma=1 --noise constant:1"
)
for run in "${logz_runs[@]}"; do
  read -r method name rest <<<"$run"
  # shellcheck disable=SC2086
  "$tilt" logz -c "$config" --method "$method" $rest -n "$paths" --steps 100 --seed 3 --threads "$threads" --json \
    > "$out/logz_${method}_${name}.json"
done

python3 - "$out" "${gammas[@]}" > "$out/study.md" <<'PY'
import json, sys, glob, os
out, gammas = sys.argv[1], sys.argv[2:]
ev = json.load(open(f"{out}/eval.json"))
S = ev["samples"]
print(f"Reward gap and distance to exact p* by stochasticity gamma (exact gDDIM step, {S[f'{out}/target.csv']['n']} samples, "
      f"energy distance as a multiple of its noise floor; exact E_p*[r] = {ev['target']['mean_reward']:.3f}):\n")
print("| gamma | memoryless fine-tune: mean reward | gap to ODE | energy dist. / floor | sigma = 1 fine-tune: mean reward | gap to ODE | energy dist. / floor |")
print("|---|---|---|---|---|---|---|")
ode = {m: S[f"{out}/{m}_gamma_0.csv"]["mean_reward"] for m in ("memoryless", "sigma1")}
for g in gammas:
    row = [("0 (ODE)" if g == "0" else "1 (memoryless)" if g == "1" else g)]
    for m in ("memoryless", "sigma1"):
        s = S[f"{out}/{m}_gamma_{g}.csv"]
        row += [f"{s['mean_reward']:.3f} ± {s['mean_reward_se']:.3f}", f"{ode[m] - s['mean_reward']:+.3f}", f"{s['energy_distance_ratio']:.2f}"]
    print("| " + " | ".join(row) + " |")
t = S[f"{out}/target.csv"]
print(f"| exact p* | {t['mean_reward']:.3f} ± {t['mean_reward_se']:.3f} | | {t['energy_distance_ratio']:.2f} | | | |")
print()
first = json.load(open(sorted(glob.glob(f"{out}/logz_*.json"))[0]))
print(f"log Z of the demo's tilt (exact {first['exact_log_z']:.4f}), {first['n']} paths, 100 steps; "
      "z = (estimate - exact) / standard error:\n")
print("| method | proposal | log Z ± SE | z | ESS / n | reweighted E_p*[r] |")
print("|---|---|---|---|---|---|")
order = ["girsanov", "noising", "jarzynski"]
files = sorted(glob.glob(f"{out}/logz_*.json"), key=lambda f: (order.index(os.path.basename(f).split("_")[1]), os.path.getmtime(f)))
for f in files:
    r = json.load(open(f))
    prop = r["proposal"] if r["method"] != "jarzynski" else f"escorted, {r['noise']}"
    if prop.endswith("model.pt"): prop = "memoryless fine-tune"
    print(f"| {r['method']} ({r['integrator'] if r['method'] != 'jarzynski' else 'euler'}) | {prop} | {r['log_z']:.4f} ± {r['log_z_standard_error']:.4f} | "
          f"{r['z_score']:+.2f} | {r['ess_fraction']:.3f} | {r['weighted_mean_reward']:.3f} |")
PY

if [ "${UPDATE_DOCS:-0}" = 1 ]; then
  mkdir -p docs/images
  cp "$out/stochasticity.png" docs/images/stochasticity.png
  cp "$out/study.md" docs/stochasticity_study.md
fi
cat "$out/study.md"
echo "study: tables $out/study.md, figure $out/stochasticity.png"
