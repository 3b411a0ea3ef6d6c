#!/usr/bin/env bash
# What an iteration of preset = "small" costs, and where (README, "Fewer steps"): tilt_ode_gap's fine-tuning of random
# problems (configs/random_family.toml plus the DSM keys: preset "small"'s K = 60 Euler chain) for ITERATIONS
# iterations, one variant at a time on one thread, the variants interleaved in ROUNDS rounds; the training seconds only
# (the scoring is cut to a token one). Variants ("small" names the K = 60 chain, the preset's until 2026-12-07): K = 60,
# Euler-Maruyama, dsm_until = 0.5 on 120 exact steps; the same on 20 exact steps (integrator = "exact", loss steps
# 6 + 3; the preset's exact chain) with the DSM chain of 120 or 40 steps; and each grid without the DSM term. Prints a line per run, then the median seconds per variant and problem.
# Options (environment): ITERATIONS=300 ROUNDS=2 SEEDS="0 8" (dimension: scripts/random_family.sh's table)
#                        OUT=runs/preset_cost  BIN=build/bench/tilt_ode_gap (another build's, to compare builds)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BIN:-build/bench/tilt_ode_gap}
[ -n "${BIN:-}" ] || scripts/build.sh -DTILT_BUILD_BENCH=ON >/dev/null
out=${OUT:-runs/preset_cost}
mkdir -p "$out"
dims=(2 3 4 5 6 7 8 9 10 3)
dsm="finetune.adjoint_matching.dsm_until=0.5 finetune.adjoint_matching.dsm_rollout=exact"
k20="finetune.num_steps=20 finetune.adjoint_matching.loss_early_steps=6 finetune.adjoint_matching.loss_late_steps=3"
k20="$k20 finetune.adjoint_matching.integrator=exact"
names=(small k20_exact_dsm120 k20_exact_dsm40 k60_no_dsm k20_exact_no_dsm)
sets=("$dsm finetune.adjoint_matching.dsm_rollout_steps=120"
      "$dsm $k20 finetune.adjoint_matching.dsm_rollout_steps=120"
      "$dsm $k20 finetune.adjoint_matching.dsm_rollout_steps=40"
      ""
      "$k20")
: > "$out/runs.txt"
for round in $(seq 1 "${ROUNDS:-2}"); do
  for s in ${SEEDS:-0 8}; do
    d=${dims[$((s % 10))]}
    for i in "${!names[@]}"; do
      args=()
      for kv in ${sets[$i]}; do args+=(--set "$kv"); done
      f="$out/${names[$i]}_seed${s}_round$round"
      "$bin" configs/random_family.toml --random "$s" --dim "$d" --iterations "${ITERATIONS:-300}" --replicates 2 \
        --samples 200 --hybrids 0 --out "$f" "${args[@]}" > /dev/null 2> "$f.log"
      line="${names[$i]} seed $s (d = $d) round $round: $(python3 -c "import json; print('%.1f' % json.load(open('$f.json'))['train_seconds'])") s"
      echo "$line" | tee -a "$out/runs.txt"
    done
  done
done
python3 - "$out/runs.txt" <<'PY'
import collections, re, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    m = re.match(r"(\S+) seed (\d+) \(d = (\d+)\) round \d+: ([\d.]+) s", line)
    if m: runs[(m[1], int(m[2]), int(m[3]))].append(float(m[4]))
problems = sorted({(s, d) for _, s, d in runs})
names = list(dict.fromkeys(n for n, _, _ in runs))
print("\n| variant | " + " | ".join("seed %d (d = %d): s" % p for p in problems) + " | / small (K = 60) |")
print("|---|" + "---|" * (len(problems) + 1))
for n in names:
    med = [statistics.median(runs[(n, s, d)]) for s, d in problems]
    ref = [statistics.median(runs[("small", s, d)]) for s, d in problems]
    print("| %s | " % n + " | ".join("%.1f" % m for m in med) + " | " +
          ", ".join("%.2f" % (m / r) for m, r in zip(med, ref)) + " |")
PY
