#!/usr/bin/env bash
# Issue 24, part 3: the SOCM paper's control-L2-error curves (Domingo-Enrich et al. 2024, its figures) at
# its own budget and settings, for adjoint matching, SOCM, cross-entropy and log-variance, on the paper's
# instances (`tilt soc --instance socm`, seed 0) and with its published error (`--l2-error socm`;
# docs/soc.md, "Metrics"). Settings from the README commands of facebookresearch/SOC-matching and its
# configs/soc.yaml defaults:
#   quadratic_ou_easy  60 000 iterations, batch 128, 50 steps
#   linear_ou          60 000 iterations, batch 64, 100 steps
#   double_well        60 000 iterations, batch 128, 200 steps (DOUBLE_WELL=1; SOCM's gamma there is 6,
#                      tilt's socm loss starts it at 2)
# and, for all: control learning rate 1e-4 (its nabla_V_lr), M's learning rate 1e-3 and initial gamma 2
# (tilt's socm defaults, as SOCM's), the control network's widths 256-128-64-128-256 (SOCM's
# "FullyConnectedUNet" has these widths with skip connections; tilt's is a plain MLP of them).
# Differences that remain: Adam's eps is tilt's 1e-8 (SOCM 1e-4), the network has no skips, and tilt
# evaluates the current control on fixed fresh paths every EVAL_EVERY iterations where SOCM records its
# training batches' error.
#
# Each (problem, loss) is one `tilt soc` run in $OUT/<problem>/<loss>/, checkpointed every CHECKPOINT_EVERY
# iterations: a finished one (summary.json) is skipped, an unfinished one continues from its checkpoint
# (`tilt soc --resume`, exactly as if never stopped), so the script may be stopped (even kill -9) and started
# again and goes on where it was. At the end: $OUT/<problem>.png (every loss's curve) and $OUT/summary.md (final
# and best errors, training time per curve: from the median of the iterations' seconds in <loss>.jsonl, evaluations excluded,
# whatever the number of invocations).
#
# The full run outlives a machine: `SAVE=1 scripts/socm_curves.sh` (while the runs go on, or after) copies what
# a run needs to continue into SAVED (default docs/socm_curves, committed): per run soc.resolved.json, the
# evaluations, every 10th line of the metrics (their median time per iteration is what the table reports), the
# checkpoint while unfinished and summary.json once finished; and the figures and table of what there is so far.
# A run missing from $OUT is restored from SAVED before it starts, so on a new machine the same command goes on
# from the last save.
#
# Options (environment): OUT=runs/socm_curves  ITERATIONS=<the paper's>  EVAL_EVERY=500  EVAL_BATCH=1024
#   PROBLEMS="quadratic_ou_easy linear_ou"  DOUBLE_WELL=0  LOSSES="adjoint_matching socm cross_entropy log_variance"
#   TILT=build/bin/tilt (copied at the start)  SEED=0  THREADS=0 (all cores)  HIDDEN=256,128,64,128,256  CHECKPOINT_EVERY=1000  NO_BUILD=0
#   BACKGROUND=0 (1: run detached at the lowest priority, log in $OUT/log)  SAVED=docs/socm_curves  SAVE=0 (1: save, run nothing)
# The full run takes many hours on 2 cores: BACKGROUND=1 scripts/socm_curves.sh, then look at $OUT/log. On 2
# cores, two single-threaded instances (one per problem) finish sooner than one with two threads:
#   PROBLEMS=quadratic_ou_easy THREADS=1 BACKGROUND=1 scripts/socm_curves.sh
#   PROBLEMS=linear_ou THREADS=1 NO_BUILD=1 BACKGROUND=1 scripts/socm_curves.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/socm_curves}
mkdir -p "$out"
saved=${SAVED:-docs/socm_curves}
if [ "${BACKGROUND:-0}" = 1 ] && [ "${SAVE:-0}" != 1 ]; then
  BACKGROUND=0 nohup nice -n 19 "$0" >> "$out/log" 2>&1 &
  echo "running in the background (pid $!): $out/log"
  exit 0
fi
problems=${PROBLEMS:-quadratic_ou_easy linear_ou}
[ "${DOUBLE_WELL:-0}" = 1 ] && problems="$problems double_well"
losses=${LOSSES:-adjoint_matching socm cross_entropy log_variance}
curves=build/bench/tilt_soc_curves

# The figures and the table of $1 (a directory of <problem>/<loss>/ runs), finished runs and those under way.
report() {
  local root=$1 p l args
  python3 - "$root" "$problems" "$losses" > "$root/summary.md" <<'PY'
import json, os, statistics, sys
root, problems, losses = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
print("# The SOCM paper's control-L2-error curves, as far as they have run\n")
print("Made by `scripts/socm_curves.sh` (docs/soc.md, \"The SOCM paper's curves\"); do not edit by hand. SOCM's")
print("published error on 1024 fixed fresh paths every 500 iterations; \"under way\": the last evaluation so far.")
print("Training time: the median of the iterations' own seconds (evaluations excluded; the median, so that the few")
print("iterations a stopped or busy machine made long do not count) times the iterations.\n")
print("| problem | loss | iterations | final control L2 error (SOCM's) | best | training time (s) | ms / iteration (median) |")
print("|---|---|---|---|---|---|---|")
for p in problems:
    for l in losses:
        d = f"{root}/{p}/{l}"
        if not os.path.exists(f"{d}/{l}.eval.jsonl"):
            continue
        evals = [json.loads(x) for x in open(f"{d}/{l}.eval.jsonl") if x.strip()]
        if not evals:
            continue
        best = min(e["control_l2_error"] for e in evals)
        secs = []
        for x in open(f"{d}/{l}.jsonl"):
            try:
                j = json.loads(x)
            except ValueError:
                continue
            if isinstance(j, dict) and isinstance(j.get("seconds"), (int, float)):
                secs.append(j["seconds"])
        ms = 1e3 * statistics.median(secs) if secs else float("nan")
        if os.path.exists(f"{d}/summary.json"):
            s = json.load(open(f"{d}/summary.json"))
            it = s["iterations"]
            print(f"| {p} | {l} | {it} | {s['losses'][l]['control_l2_error']:.4g} | {best:.4g} | {ms * it / 1e3:.0f} | {ms:.1f} |")
        else:
            total = json.load(open(f"{d}/soc.resolved.json"))["iterations"]
            it = evals[-1]["iteration"]
            print(f"| {p} | {l} | under way: {it} of {total} | {evals[-1]['control_l2_error']:.4g} (at {it}) | {best:.4g} | {ms * it / 1e3:.0f} so far | {ms:.1f} |")
PY
  for p in $problems; do
    args=()
    for l in $losses; do
      [ -s "$root/$p/$l/$l.eval.jsonl" ] || continue
      if [ -f "$root/$p/$l/summary.json" ]; then args+=("$l=$root/$p/$l/$l.eval.jsonl"); else args+=("$l (under way)=$root/$p/$l/$l.eval.jsonl"); fi
    done
    if [ ${#args[@]} -gt 0 ]; then
      "$curves" -o "$root/$p.png" --title "$p (SOCM instance, seed ${SEED:-0})" "${args[@]}"
      printf '\n![%s: control L2 error (SOCM'"'"'s) against iteration](%s.png)\n' "$p" "$p" >> "$root/summary.md"
    fi
  done
  echo "wrote $root/summary.md and $root/<problem>.png"
  cat "$root/summary.md"
}

if [ "${SAVE:-0}" = 1 ]; then
  for p in $problems; do
    for l in $losses; do
      src=$out/$p/$l dst=$saved/$p/$l
      [ -f "$src/soc.resolved.json" ] || continue
      mkdir -p "$dst"
      # The checkpoint first: the evaluations copied after it reach at least its iteration (each is written
      # before the checkpoint of its iteration), and a resume drops those after it. Lines cut short by a
      # write under way are left out.
      if [ -f "$src/summary.json" ]; then
        cp "$src/summary.json" "$dst/"; rm -f "$dst/$l.checkpoint.pt"
      elif [ -f "$src/$l.checkpoint.pt" ]; then
        cp "$src/$l.checkpoint.pt" "$dst/$l.checkpoint.pt.tmp" && mv "$dst/$l.checkpoint.pt.tmp" "$dst/$l.checkpoint.pt"
      fi
      cp "$src/soc.resolved.json" "$dst/"
      python3 - "$src/$l.eval.jsonl" "$src/$l.jsonl" "$dst/$l.eval.jsonl" "$dst/$l.jsonl" <<'PY'
import json, os, sys
def lines(path):
    out = []
    for x in (open(path) if os.path.exists(path) else []):
        try:
            j = json.loads(x)
        except ValueError:
            continue
        if isinstance(j, dict) and isinstance(j.get("iteration"), int):
            out.append(j)
    return out
def write(path, rows):
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)
write(sys.argv[3], lines(sys.argv[1]))
write(sys.argv[4], [{k: j[k] for k in ("iteration", "seconds", "loss") if k in j}
                    for j in lines(sys.argv[2]) if j["iteration"] % 10 == 0])
PY
    done
  done
  report "$saved"
  exit 0
fi

[ "${NO_BUILD:-0}" = 1 ] || JOBS=${JOBS:-2} scripts/build.sh -DTILT_BUILD_APPS=ON -DTILT_BUILD_BENCH=ON >/dev/null
# The runs use a private copy of the binary (TILT, default build/bin/tilt), so that rebuilding meanwhile does not
# touch them; it is removed when the script ends.
tilt=$out/.tilt.$$
cp "${TILT:-build/bin/tilt}" "$tilt"
trap 'rm -f "$tilt"' EXIT

# The paper's budget per problem: iterations batch steps.
settings() {
  case $1 in
    quadratic_ou_easy) echo "60000 128 50" ;;
    linear_ou) echo "60000 64 100" ;;
    double_well) echo "60000 128 200" ;;
    *) echo "unknown problem '$1'" >&2; exit 1 ;;
  esac
}

for p in $problems; do
  read -r iterations batch steps <<<"$(settings "$p")"
  iterations=${ITERATIONS:-$iterations}
  for l in $losses; do
    dir=$out/$p/$l
    if [ ! -f "$dir/soc.resolved.json" ] && [ -f "$saved/$p/$l/soc.resolved.json" ]; then
      mkdir -p "$dir" && cp "$saved/$p/$l"/* "$dir/"
      echo "$(date -u +%FT%TZ) restored $p / $l from $saved"
    fi
    if [ -f "$dir/summary.json" ]; then echo "done already: $p / $l"; continue; fi
    resume=() what=start
    if [ -f "$dir/soc.resolved.json" ]; then resume=(--resume) what=resume; else rm -rf "$dir"; fi
    mkdir -p "$(dirname "$dir")"
    echo "$(date -u +%FT%TZ) $what $p / $l: $iterations iterations, batch $batch, $steps steps"
    start=$(date +%s)
    "$tilt" soc -q -p "$p" -l "$l" --instance socm --l2-error socm --seed "${SEED:-0}" --threads "${THREADS:-0}" \
      --iterations "$iterations" --batch "$batch" --steps "$steps" --lr 1e-4 --hidden "${HIDDEN:-256,128,64,128,256}" \
      --eval-every "${EVAL_EVERY:-500}" --eval-batch "${EVAL_BATCH:-1024}" \
      --checkpoint-every "${CHECKPOINT_EVERY:-1000}" "${resume[@]}" -o "$dir" >> "$dir.log" 2>&1 \
      || { echo "failed: $p / $l (see $dir.log)"; tail -5 "$dir.log"; exit 1; }
    echo "$(date -u +%FT%TZ) done $p / $l ($(( $(date +%s) - start )) s in this invocation)"
  done
done

report "$out"
