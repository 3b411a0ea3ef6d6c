#!/usr/bin/env bash
# Issue 23 (Reinforce and Efficient Adjoint Matching, docs/equations.md, E128-E134): time to quality against Adjoint
# Matching. On the
# 2-D demo and a random 10-D mixture with exact p* (random_tilt_problem), ONE configuration (configs/random_family.toml:
# K = 60, batch 256, lr 4e-3 cosine over the run), each method trained for several budgets of iterations (a run per
# budget, its cosine schedule over its own length: what a user who stops at that budget gets), scored by tilt_ode_gap
# (energy distance of memoryless-SDE and ODE samples to exact p* over the noise floor, mean of REPLICATES sets of 2000)
# with the training's wall time. Methods:
#   am      Adjoint Matching (each iteration: a rollout of 256 paths, their lean adjoint, the regression on 30 steps)
#   am_dsm  the same with dsm_until = 0.5 (E106: the fix that lets Adjoint Matching reach p* on the 10-D problems)
#   ram  RAM: 256 endpoints from the model's 60-step ODE, noise_draws = 4 noisings each, no reward gradient
#   eam    Efficient Adjoint Matching (E131-E134): the same endpoints and noisings, the closed-form adjoint's target
#   eam_w  EAM with path_weights = true: endpoints from the model's memoryless SDE, weighted below weights_until = 0.5
#   buf_w  buffered Adjoint Matching (E126): a refill of buffer_size = 1024 paths and their lean adjoints serves
#          1024 x buffer_passes (4) / 256 = 16 iterations, the stale terms weighted by dQ_theta/dQ_old after t_k ("future")
#   buf    the same buffer unweighted ("none", the Stable Diffusion code's buffer, E127)
#   buf_dsm, buf_w_dsm  the buffers with dsm_until = 0.5 (the buffer keeps t >= 0.5; E106's DSM term the rest)
# Resumable: a result that exists is skipped. JOBS runs at a time, interleaved (method inner, budget outer), so that
# the machine's load falls alike on both. Writes $OUT/<problem>_<method>_i<iterations>_s<seed>.json (and the trainer's
# metrics.jsonl beside it), $OUT/summary.md and the figures $OUT/ram_<problem>.png (against training seconds) and
# $OUT/ram_<problem>_iterations.png (UPDATE_DOCS=1 copies them to docs/ram_study.md and docs/images/).
# Options (environment): OUT=runs/ram  PROBLEMS="demo 8:10"  BUDGETS="300 600 1200 2400"  REPLICATES=10  JOBS=2
#                        METHODS (default: all nine above, about 2.5 hours on 2 cores; "am_dsm ram" about 40 min)
#                        SEEDS="0 1 2" (training seeds: tilt_ode_gap --train-seed)
#                        LAMBDAS="0.25 0.5 1" (the demo's lambda sweep of RAM's first-order error, E130, for
#                        LAMBDA_METHODS="am_dsm ram eam eam_w"; LAMBDAS=" " skips it)
#                        TAUS="0.3 0.5 0.7 1" (eam_w's weights_until on both problems, E134; only when METHODS has eam_w)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh -DTILT_BUILD_BENCH=ON >/dev/null
out=${OUT:-runs/ram}
mkdir -p "$out"
all_methods="am am_dsm ram eam eam_w buf buf_w buf_dsm buf_w_dsm"
# The --set options of method $1, into the caller's array `sets`.
method_sets() {
  case $1 in
    am) ;;
    am_dsm) sets+=(--set finetune.adjoint_matching.dsm_until=0.5) ;;
    ram) sets+=(--set finetune.method=ram) ;;
    eam) sets+=(--set finetune.method=eam) ;;
    eam_w) sets+=(--set finetune.method=eam --set finetune.eam.path_weights=true) ;;
    buf|buf_w|buf_dsm|buf_w_dsm)
      local w=none
      [[ $1 == buf_w* ]] && w=future
      sets+=(--set finetune.adjoint_matching.buffer_size=1024 --set finetune.adjoint_matching.buffer_passes=4
             --set "finetune.adjoint_matching.buffer_weights=$w")
      [[ $1 == *_dsm ]] && sets+=(--set finetune.adjoint_matching.dsm_until=0.5)
      return 0 ;;
    *) echo "unknown method $1" >&2; return 1 ;;
  esac
}
run_one() {
  local seed=${1%%:*} dim=${1##*:} method=$2 n=$3 train_seed=$4
  local f="$out/seed${seed}_d${dim}_${method}_i${n}_s${train_seed}" problem=(configs/random_family.toml --random "$seed" --dim "$dim")
  [ "$1" = demo ] && f="$out/demo_${method}_i${n}_s${train_seed}" && problem=(configs/demo_2d.toml)
  [ -f "$f.json" ] && return 0
  local sets=()
  method_sets "$method" || return 1
  build/bench/tilt_ode_gap "${problem[@]}" --iterations "$n" --replicates "${REPLICATES:-10}" --hybrids 0 \
    --train-seed "$train_seed" ${sets[@]+"${sets[@]}"} --metrics "$f.metrics.jsonl" --out "$f" > /dev/null
  echo "$1 $method $n seed $train_seed done" >&2
}
pids=()
for s in ${SEEDS:-0 1 2}; do
  for n in ${BUDGETS:-300 600 1200 2400}; do
    for p in ${PROBLEMS:-demo 8:10}; do
      for m in ${METHODS:-$all_methods}; do
        run_one "$p" "$m" "$n" "$s" &
        pids+=($!)
        if [ "${#pids[@]}" -ge "${JOBS:-2}" ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
      done
    done
  done
done
wait
# E130 on the demo: RAM's distance to p* against lambda (seed 0, 1200 iterations), beside Adjoint Matching's.
pids=()
for l in ${LAMBDAS:-0.25 0.5 1}; do
  for m in ${LAMBDA_METHODS:-am_dsm ram eam eam_w}; do
    f="$out/lambda${l}_demo_${m}"
    [ -f "$f.json" ] && continue
    sets=(--set "reward.lambda=$l")
    method_sets "$m"
    build/bench/tilt_ode_gap configs/demo_2d.toml --iterations 1200 --replicates "${REPLICATES:-10}" --hybrids 0 \
      "${sets[@]}" --out "$f" > /dev/null &
    pids+=($!)
    if [ "${#pids[@]}" -ge "${JOBS:-2}" ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
  done
done
wait
# E134 on both problems: eam_w against weights_until (seed 0, 1200 iterations), when METHODS has eam_w.
pids=()
if [[ " ${METHODS:-$all_methods} " == *" eam_w "* ]]; then
  for tau in ${TAUS:-0.3 0.5 0.7 1}; do
    for p in ${PROBLEMS:-demo 8:10}; do
      f="$out/tau${tau}_${p/:/_d}" problem=(configs/random_family.toml --random "${p%%:*}" --dim "${p##*:}")
      [ "$p" = demo ] && problem=(configs/demo_2d.toml)
      [ -f "$f.json" ] && continue
      build/bench/tilt_ode_gap "${problem[@]}" --iterations 1200 --replicates "${REPLICATES:-10}" --hybrids 0 \
        --set finetune.method=eam --set finetune.eam.path_weights=true --set "finetune.eam.weights_until=$tau" \
        --out "$f" > /dev/null &
      pids+=($!)
      if [ "${#pids[@]}" -ge "${JOBS:-2}" ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
    done
  done
fi
wait
python3 - "$out" > "$out/summary.md" <<'PY'
import collections, json, pathlib, re, statistics, subprocess, sys
out = pathlib.Path(sys.argv[1])
runs = collections.defaultdict(list)
for f in sorted(out.glob("*_i*_s*.json")):
    if f.name.startswith("lambda"):
        continue
    m = re.match(r"(.+)_(am|am_dsm|ram|eam|eam_w|buf|buf_w|buf_dsm|buf_w_dsm)_i(\d+)_s(\d+)$", f.stem)
    runs[(m.group(1), m.group(2), int(m.group(3)))].append(json.loads(f.read_text()))
print("# Reinforce and Efficient Adjoint Matching beside Adjoint Matching: time to quality\n")
print("Made by `scripts/ram_study.sh` (`tilt_ode_gap` on configs/demo_2d.toml and on configs/random_family.toml "
      "--random 8 --dim 10, `--train-seed` 0, 1, 2; do not edit by hand). One configuration: K = 60, batch 256, lr 4e-3 "
      "with a cosine decay over each run's own iterations; a separate run per budget. `am`: Adjoint Matching. `am_dsm`: with `dsm_until = 0.5` (E106). `ram`: "
      "Reinforce Adjoint Matching (256 endpoints from the model's 60-step ODE, 4 noisings each). `eam`: Efficient "
      "Adjoint Matching on the same endpoints and noisings (E131-E133). `eam_w`: EAM with `path_weights = true` (256 "
      "memoryless-SDE endpoints weighted towards p* below `weights_until = 0.5`, E134). `buf_w` and `buf`: buffered "
      "Adjoint Matching (a refill of 1024 paths and their lean adjoints serves 16 iterations; the stale terms weighted "
      "by dQ_theta/dQ_old after t_k, E126, or not, E127); `buf_dsm`, `buf_w_dsm`: the same with `dsm_until = 0.5`. Distances: energy "
      "distance of 2000 samples to 2000 exact samples of p*, over the noise floor, each run's mean over 10 sets; the "
      "table gives the median over the training seeds and each seed's value. Seconds: training only (median), two "
      "runs at a time on a 2-core machine, one thread each.\n")
print("| problem | method | iterations | train s | SDE / floor: median (seeds) | ODE / floor: median (seeds) | exact field SDE / ODE |")
print("|---|---|---|---|---|---|---|")
series = collections.defaultdict(list)
for (problem, method, its), js in sorted(runs.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
    med = lambda key: statistics.median(j["model"][key][0] for j in js)
    cell = lambda key: "%.2f (%s)" % (med(key), ", ".join("%.2f" % j["model"][key][0] for j in js))
    secs = statistics.median(j["train_seconds"] for j in js)
    e = js[0]["exact_field"]
    print(f"| {problem} | {method} | {its} | {secs:.0f} | {cell('sde')} | {cell('ode')} | {e['sde'][0]:.2f} / {e['ode'][0]:.2f} |")
    for sampler in ("sde", "ode"):
        series[(problem, method, sampler)].append({"seconds": secs, "iterations": its, "ratio": med(sampler)})
sweep = sorted(out.glob("lambda*_demo_*.json"))
if sweep:
    print("\n## The distance to p* against lambda (RAM's first-order error, E130)\n")
    print("The demo at lambda = 0.25, 0.5, 1 (its own), 1200 iterations, training seed 0; the noise floor is that of "
          "each lambda's p*.\n")
    print("| lambda | method | SDE / floor | ODE / floor |")
    print("|---|---|---|---|")
    for f in sorted(sweep, key=lambda f: (float(re.match(r"lambda([0-9.]+)_", f.name).group(1)), f.name)):
        m = re.match(r"lambda([0-9.]+)_demo_(.+)$", f.stem)
        j = json.loads(f.read_text())
        print(f"| {m.group(1)} | {m.group(2)} | {j['model']['sde'][0]:.2f} | {j['model']['ode'][0]:.2f} |")
taus = sorted(out.glob("tau*.json"))
if taus:
    print("\n## EAM with path weights against weights_until (E134)\n")
    print("`eam_w` with the weights on the rows with t < weights_until only (1: every row), 1200 iterations, training "
          "seed 0.\n")
    print("| problem | weights_until | SDE / floor | ODE / floor | train s |")
    print("|---|---|---|---|---|")
    for f in sorted(taus, key=lambda f: (re.match(r"tau[0-9.]+_(.+)$", f.stem).group(1), float(re.match(r"tau([0-9.]+)_", f.name).group(1)))):
        m = re.match(r"tau([0-9.]+)_(.+)$", f.stem)
        j = json.loads(f.read_text())
        print(f"| {m.group(2)} | {m.group(1)} | {j['model']['sde'][0]:.2f} | {j['model']['ode'][0]:.2f} | {j['train_seconds']:.0f} |")
for problem in sorted({k[0] for k in series}):
    files = []
    for (p, method, sampler), rows in sorted(series.items()):
        if p != problem:
            continue
        path = out / f"curve_{problem}_{method}_{sampler}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        if sampler == "sde":  # nine methods: the figures show the SDE's distance, the table both
            files.append(f"{method}={path}")
    for x, suffix, label in (("seconds", "", "training seconds (1 thread)"), ("iterations", "_iterations", "iterations")):
        subprocess.run(["build/bench/tilt_soc_curves", "-o", str(out / f"ram_{problem}{suffix}.png"), "--title",
                        f"{problem}: time to quality (SDE samples, median of 3 seeds)", "--x", x, "--y", "ratio",
                        "--x-label", label, "--y-label", "energy distance / floor", "--log-y", "1"]
                       + files, check=True, stdout=subprocess.DEVNULL)
PY
cat "$out/summary.md"
if [ "${UPDATE_DOCS:-0}" = 1 ]; then
  cp "$out/summary.md" docs/ram_study.md
  for f in "$out"/ram_*.png; do cp "$f" docs/images/; done
fi
