#!/usr/bin/env bash
# Adjoint Matching's U-Net iteration (B = 8, K = 10; MODE=lora, the default: LoRA rank 4; MODE=residual: a residual
# U-Net, whose base graphs tilt keeps from the rollout) against its PyTorch reference in interleaved rounds, each
# with the malloc setting as each side has it and swapped: tilt (keep_cpu_memory), tilt with TILT_MALLOC=system,
# PyTorch, PyTorch with tilt's setting (glibc's environment variables). On a machine whose
# timings drift from one minute to the next, rounds side by side compare better than whole runs one after another
# (README, "Image networks"). Prints one line of ms per iteration per round, then the medians, the best, and the
# ratios taken within each round.
# Needs build/bench/tilt_bench (scripts/build.sh -DTILT_BUILD_BENCH=ON) and Debian's PyTorch for /usr/bin/python3.
#
#   [MODE=lora|residual] [LORA_FORM=merged|adapter] scripts/bench_unet_rounds.sh [ROUNDS (default 6)]
#       [THREADS (default 2)]
# LORA_FORM: how the PyTorch reference's LoRA layers compute (am_reference.py --lora-form): with the merged weight
# (default) or as W x + (alpha/r) B (A x) in every pass, as peft's LoRA layers do.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-6}
threads=${2:-2}
python=${PYTHON:-/usr/bin/python3}
case "${LORA_FORM:-merged}" in
  merged|adapter) ;;
  *) echo "bench_unet_rounds: LORA_FORM must be merged or adapter, got '$LORA_FORM'" >&2; exit 2 ;;
esac
case "${MODE:-lora}" in
  lora) arg=2; problem=(--problem unet --lora-form "${LORA_FORM:-merged}") ;;
  residual) arg=0; problem=(--problem unet_residual) ;;
  *) echo "bench_unet_rounds: MODE must be lora or residual, got '$MODE'" >&2; exit 2 ;;
esac
[ -x build/bench/tilt_bench ] || { echo "bench_unet_rounds: build/bench/tilt_bench is missing" >&2; exit 2; }
py() {
  "$python" bench/reference/am_reference.py "${problem[@]}" --method am --threads "$threads" --min-time 4 --warmup 2 \
    --min-iters 4 | "$python" -c 'import json, sys; print("%.0f" % json.load(sys.stdin)["iteration_ms"])'
}
cpp() {
  TILT_THREADS=$threads build/bench/tilt_bench --benchmark_filter="^BM_UNetIteration/$arg/8/10/" \
    --benchmark_repetitions=2 --benchmark_report_aggregates_only=true | awk '/_median/ { print $2 }'
}
log=build/bench_unet_rounds_${MODE:-lora}${LORA_FORM:+_$LORA_FORM}.txt
echo "tilt tilt_TILT_MALLOC=system pytorch pytorch_kept_memory" | tee "$log"
for _ in $(seq "$rounds"); do
  echo "$(cpp) $(TILT_MALLOC=system cpp) $(py) $(MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=-1 py)" \
    | tee -a "$log"
done
"$python" - "$log" <<'PY'
import statistics, sys
rows = [list(map(float, l.split())) for l in open(sys.argv[1]).read().split("\n")[1:] if l.strip()]
cols = list(zip(*rows))
names = ["tilt", "tilt, TILT_MALLOC=system", "PyTorch", "PyTorch with tilt's malloc setting"]
med, best = [statistics.median(c) for c in cols], [min(c) for c in cols]
for j, (n, m, b) in enumerate(zip(names, med, best)):
    ratios = sorted(r[2] / r[j] for r in rows)  # PyTorch / this, within each round
    print(f"{n}: median {m:.0f} ms (best {b:.0f}); PyTorch / this, round by round: median"
          f" {statistics.median(ratios):.2f}x, range {ratios[0]:.2f}-{ratios[-1]:.2f}x")
ratios = sorted(r[3] / r[0] for r in rows)
print(f"PyTorch with tilt's malloc setting / tilt, round by round: median {statistics.median(ratios):.2f}x,"
      f" range {ratios[0]:.2f}-{ratios[-1]:.2f}x")
PY
