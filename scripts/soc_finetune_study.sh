#!/usr/bin/env bash
# Issue 18 (part): every SOC loss as a fine-tuning method. The 2-D demo (configs/demo_2d.toml: its mixture,
# exact base velocity, reward and [finetune] budget) posed as an SOC problem (tilt/soc/finetuning.h); each
# SOC loss trains a control network with the same budget, and the fine-tuned velocity v_base + sigma u / c_v
# is scored by the energy distance of 2000 samples to exact p*, over the noise floor, with the memoryless
# SDE and the ODE (Heun). Adjoint Matching's own path (tilt finetune) is the first row.
# Writes $OUT/soc_finetune.md; UPDATE_DOCS=1 copies it to docs/soc_finetune_table.md.
# Options (environment): OUT=runs/soc_finetune  ITERATIONS=<config's>  SAMPLES=2000  LOSSES=a,b,...
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh -DTILT_BUILD_BENCH=ON >/dev/null
out=${OUT:-runs/soc_finetune}
mkdir -p "$out"
args=(configs/demo_2d.toml --samples "${SAMPLES:-2000}" --markdown "$out/soc_finetune.md")
[ -n "${ITERATIONS:-}" ] && args+=(--iterations "$ITERATIONS")
[ -n "${LOSSES:-}" ] && args+=(--losses "$LOSSES")
build/bench/tilt_soc_finetune "${args[@]}"
if [ "${UPDATE_DOCS:-0}" = 1 ]; then cp "$out/soc_finetune.md" docs/soc_finetune_table.md; fi
