#!/usr/bin/env bash
# The headline demo: sets up, builds, and reproduces "fine-tuning with different noise schedules".
#
# A 2-D Gaussian-mixture base (exact velocity field) and a quadratic reward; Adjoint Matching with
# constant sigma = 0.2, constant sigma = 1 and the memoryless schedule; each model sampled with its
# fine-tuning schedule (and the memoryless one also with the ODE), beside exact samples of
# p* ∝ p_base exp(lambda r). Writes runs/demo/{demo_2d.png, eval.txt, eval.json}.
# Options (environment): OUT=runs/demo  N=2000 samples per panel  UPDATE_DOCS=1 copies the figure and
# the numbers into docs/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh -DTILT_BUILD_TESTS=OFF -DTILT_BUILD_APPS=ON

tilt=build/bin/tilt
config=configs/demo_2d.toml
out=${OUT:-runs/demo}
n=${N:-2000}
mkdir -p "$out"

finetune() {  # name noise
  local dir="$out/$1"
  if [ -f "$dir/model.pt" ]; then
    echo "demo: reusing $dir/model.pt (delete $dir to fine-tune again)"
  elif [ -f "$dir/checkpoint.pt" ]; then
    "$tilt" finetune -c "$config" --set finetune.noise="$2" -o "$dir" --resume
  else
    "$tilt" finetune -c "$config" --set finetune.noise="$2" -o "$dir"
  fi
}
finetune sigma_0.2 constant:0.2
finetune sigma_1 constant:1.0
finetune memoryless memoryless

"$tilt" sample --exact base -c "$config" -n "$n" -o "$out/base.csv"
"$tilt" sample --exact target -c "$config" -n "$n" -o "$out/target.csv"
"$tilt" sample -m "$out/sigma_0.2/model.pt" -n "$n" --steps 200 -o "$out/sigma_0.2.csv"
"$tilt" sample -m "$out/sigma_1/model.pt" -n "$n" --steps 200 -o "$out/sigma_1.csv"
"$tilt" sample -m "$out/memoryless/model.pt" -n "$n" --steps 200 -o "$out/memoryless.csv"
"$tilt" sample -m "$out/memoryless/model.pt" -n "$n" --noise ode --steps 100 -o "$out/memoryless_ode.csv"

"$tilt" plot -o "$out/demo_2d.png" --columns 3 --title "Fine-tuning with different noise schedules (Adjoint Matching)" \
  "$out/base.csv:base p_base" \
  "$out/sigma_0.2.csv:fine-tuned, sigma = 0.2" \
  "$out/sigma_1.csv:fine-tuned, sigma = 1" \
  "$out/memoryless.csv:fine-tuned, memoryless" \
  "$out/memoryless_ode.csv:memoryless, ODE sampling" \
  "$out/target.csv:exact p* = p_base exp(r) / Z"

samples=(-s "$out/base.csv" -s "$out/sigma_0.2.csv" -s "$out/sigma_1.csv" -s "$out/memoryless.csv"
         -s "$out/memoryless_ode.csv" -s "$out/target.csv")
"$tilt" eval -c "$config" "${samples[@]}" | tee "$out/eval.txt"
"$tilt" eval -c "$config" "${samples[@]}" --json > "$out/eval.json"

if [ "${UPDATE_DOCS:-0}" = 1 ]; then
  mkdir -p docs/images
  cp "$out/demo_2d.png" docs/images/demo_2d.png
  cp "$out/eval.txt" docs/demo_2d_eval.txt
fi
echo "demo: figure $out/demo_2d.png, metrics $out/eval.txt and $out/eval.json"
