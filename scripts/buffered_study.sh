#!/usr/bin/env bash
# Issue 23 (buffered Adjoint Matching, docs/equations.md, E126-E127): does a replay buffer of trajectories and their
# lean adjoints reach p* in less time than Adjoint Matching? On the 2-D demo and a random 10-D mixture with exact p*
# (random_tilt_problem), ONE configuration (configs/random_family.toml: K = 60, batch 256, lr 4e-3 cosine), scored by
# tilt_ode_gap (energy distance of memoryless-SDE and ODE samples to exact p* over the noise floor, mean of
# REPLICATES sets of 2000) with the training's wall time. Variants:
#   am           Adjoint Matching, ITERATIONS iterations (each: a rollout of 256 paths and their lean adjoint)
#   am_quarter   Adjoint Matching, ITERATIONS / 4 iterations: the same number of simulated trajectories as the buffers
#   buf_future   buffer_size = 1024 and buffer_passes = 4 (a refill of 1024 paths serves 16 iterations: a quarter of
#                the simulation per iteration), the terms weighted by dQ_theta/dQ_old after t_k (E126)
#   buf_none     the same, unweighted (the Stable Diffusion code's buffer)
# Resumable: a result that exists is skipped. JOBS runs at a time. Writes $OUT/<problem>_<variant>.json (and the
# trainer's metrics.jsonl beside it) and $OUT/summary.md (UPDATE_DOCS=1 copies it to docs/buffered.md).
# Options (environment): OUT=runs/buffered  PROBLEMS="demo 8:10"  ITERATIONS=2400  REPLICATES=10  JOBS=2
#                        VARIANTS="am am_quarter buf_future buf_none"  SEEDS="0 1 2" (training seeds: the network's
#                        initialisation and the training draws; tilt_ode_gap --train-seed)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh -DTILT_BUILD_BENCH=ON >/dev/null
out=${OUT:-runs/buffered}
its=${ITERATIONS:-2400}
mkdir -p "$out"
run_one() {
  local seed=${1%%:*} dim=${1##*:} variant=$2 train_seed=$3
  local f="$out/seed${seed}_d${dim}_${variant}_s${train_seed}" problem=(configs/random_family.toml --random "$seed" --dim "$dim")
  [ "$1" = demo ] && f="$out/demo_${variant}_s${train_seed}" && problem=(configs/demo_2d.toml)
  [ -f "$f.json" ] && return 0
  local sets=() n=$its
  case $variant in
    am) ;;
    am_quarter) n=$((its / 4)) ;;
    buf_future|buf_none)
      sets=(--set finetune.adjoint_matching.buffer_size=1024 --set finetune.adjoint_matching.buffer_passes=4
            --set "finetune.adjoint_matching.buffer_weights=${variant#buf_}") ;;
    *) echo "unknown variant $variant" >&2; return 1 ;;
  esac
  build/bench/tilt_ode_gap "${problem[@]}" --iterations "$n" --replicates "${REPLICATES:-10}" --hybrids 0 \
    --train-seed "$train_seed" ${sets[@]+"${sets[@]}"} --metrics "$f.metrics.jsonl" --out "$f" > /dev/null
  echo "$1 $variant seed $train_seed done" >&2
}
pids=()
for s in ${SEEDS:-0 1 2}; do
  for p in ${PROBLEMS:-demo 8:10}; do
    for v in ${VARIANTS:-am am_quarter buf_future buf_none}; do
      run_one "$p" "$v" "$s" &
      pids+=($!)
      if [ "${#pids[@]}" -ge "${JOBS:-2}" ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
    done
  done
done
wait
python3 - "$out" > "$out/summary.md" <<'PY'
import collections, json, pathlib, statistics, sys
out = pathlib.Path(sys.argv[1])
variants = ["am", "am_quarter", "buf_future", "buf_none"]
runs = collections.defaultdict(list)
for f in sorted(out.glob("*_s*.json")):
    stem, seed = f.stem.rsplit("_s", 1)
    variant = next(v for v in sorted(variants, key=len, reverse=True) if stem.endswith("_" + v))
    runs[(stem[: -len(variant) - 1], variants.index(variant))].append(json.loads(f.read_text()))
print("# Buffered Adjoint Matching beside Adjoint Matching\n")
print("Made by `scripts/buffered_study.sh` (`tilt_ode_gap` on configs/demo_2d.toml and on configs/random_family.toml "
      "--random 8 --dim 10, `--train-seed` 0, 1, 2; do not edit by hand). One configuration: K = 60, batch 256, lr 4e-3 "
      "cosine over the run's iterations. `am`: Adjoint Matching. `am_quarter`: the same for a quarter of the iterations, "
      "so that it simulates as many trajectories as the buffers. `buf_future` / `buf_none`: `buffer_size = 1024`, "
      "`buffer_passes = 4` (a refill of 1024 trajectories and their lean adjoints serves 16 iterations), with "
      "`buffer_weights = \"future\"` (E126) or `\"none\"` (E127). Distances: energy distance of 2000 samples to 2000 "
      "exact samples of p*, over the noise floor, each run's mean over 10 sets; the table gives the median over the "
      "training seeds and each seed's value. Seconds: training only (median), two runs at a time on a 2-core machine, "
      "one thread each.\n")
print("| problem | variant | iterations | trajectories simulated | train s | SDE / floor: median (seeds) | ODE / floor: median (seeds) | exact field SDE / ODE |")
print("|---|---|---|---|---|---|---|---|")
for (problem, v), js in sorted(runs.items()):
    variant = variants[v]
    its = js[0]["iterations"]
    simulated = 256 * its // (4 if variant.startswith("buf") else 1)
    cell = lambda key: "%.2f (%s)" % (statistics.median(j["model"][key][0] for j in js), ", ".join("%.2f" % j["model"][key][0] for j in js))
    e = js[0]["exact_field"]
    print(f"| {problem} | {variant} | {its} | {simulated} | {statistics.median(j['train_seconds'] for j in js):.0f} "
          f"| {cell('sde')} | {cell('ode')} | {e['sde'][0]:.2f} / {e['ode'][0]:.2f} |")
PY
cat "$out/summary.md"
if [ "${UPDATE_DOCS:-0}" = 1 ]; then cp "$out/summary.md" docs/buffered.md; fi
