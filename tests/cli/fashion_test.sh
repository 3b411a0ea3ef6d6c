#!/usr/bin/env bash
# scripts/fashion.sh (the paper's table in miniature on Fashion-MNIST) on a tiny U-Net and 2000 images: the same
# code path as the study, from the Debian dataset to the table. Checks what the study's claims rest on: every run of
# the table was trained, every model sampled at all ten classes, every samples file scored per class, and the table
# has every row; then scripts/fashion_long.sh's stages. Needs the dataset (scripts/setup.sh installs
# dataset-fashion-mnist); ~75 s on 2 cores.
# Usage: fashion_test.sh TILT_BINARY SOURCE_DIR
tilt=$1
src=$2
. "$(dirname "$0")/lib.sh"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

if ! TINY=1 NO_BUILD=1 TILT="$tilt" OUT="$out" THREADS=2 TILT_QUIET=1 "$src/scripts/fashion.sh" > "$out/log" 2>&1; then
  fail "scripts/fashion.sh TINY=1: $(tail -5 "$out/log")"
  echo "$passed passed, $failed failed"
  exit 1
fi
pass "scripts/fashion.sh TINY=1 ran"

runs="am_l1 am_sigma1_l1 discrete_adjoint_l1 am_l5 am_sigma1_l5 discrete_adjoint_l5 draft1 refl ddpo am_copy_l1 am_bright"
missing=""
for r in $runs; do
  [ -f "$out/$r/model.pt" ] && [ -f "$out/$r/metrics.jsonl" ] || missing+=" $r"
done
[ -z "$missing" ] && pass "every fine-tuning run wrote its model" || fail "runs without a model:$missing"

# Each samples file: 3 samples at each of the 10 classes, 784 pixels and 10 condition columns.
bad=""
for r in base $runs; do
  f="$out/$r/samples_n3_heun2.csv"
  rows=$(($(wc -l < "$f") - 1))
  cols=$(head -1 "$f" | tr ',' '\n' | wc -l)
  [ "$rows" = 30 ] && [ "$cols" = 794 ] || bad+=" $r($rows x $cols)"
done
[ -z "$bad" ] && pass "every model sampled at every class" || fail "samples files of the wrong shape:$bad"

# The evaluation: every class of every file scored, the real images are the 2000 of data.limit, and the target's
# effective sample size is at most the base's 30 samples.
check=$(python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
for lam, files in (("1", 9), ("5", 7)):
    e = json.load(open("%s/eval_l%s.json" % (out, lam)))
    assert len(e["samples"]) == files, (lam, len(e["samples"]))
    for path, s in e["samples"].items():
        assert len(s["classes"]) == 10, path
        for key in ("mean_reward", "class_share", "diversity", "feature_diversity", "frechet"):
            assert key in s["summary"], (path, key)
        assert "unseen" in s["summary"], path
    assert e["real"]["summary"]["n"] == 2000, e["real"]["summary"]["n"]
    assert e["floor"]["summary"]["n"] == 30 and len(e["floor"]["classes"]) == 10, e["floor"]["summary"]
    assert 1 <= e["target"]["summary"]["n"] <= 30, e["target"]["summary"]["n"]
    assert e["target"]["lambda"] == float(lam)
print("ok")
PY
)
[ "$check" = ok ] && pass "eval-images scored every class of every file" || fail "evaluation: $check"

table="$out/fashion.md"
bad=""
for row in "base model" "Adjoint Matching (memoryless)" "Adjoint Matching, sigma = 1" "discrete adjoint" "DRaFT-1" "ReFL" "DDPO" \
           "target p" "real images" "floor: real images"; do
  [ "$(grep -c "^| $row" "$table")" = 2 ] || bad+=" '$row'"
done
grep -q "^| full copy (lr 2e-4)" "$table" && grep -q "^| Adjoint Matching, brightness" "$table" || bad+=" copy/brightness"
[ -z "$bad" ] && pass "the table has every row at both lambdas" || fail "table rows missing or repeated:$bad"
[ -f "$out/grid_l1.png" ] && [ -f "$out/grid_l5.png" ] && pass "one grid per lambda" || fail "grids missing"

# Killed runs: one after its last checkpoint (no model.pt yet) resumes from it; one killed before any checkpoint
# (a run directory without checkpoint.pt) is started again instead of stopping the study with "already holds a run".
rm "$out/am_l1/model.pt" "$out/am_l1/samples_n3_heun2.csv"
rm "$out/ddpo/model.pt" "$out/ddpo/checkpoint.pt" "$out/ddpo/samples_n3_heun2.csv"
if TINY=1 NO_BUILD=1 TILT="$tilt" OUT="$out" THREADS=2 TILT_QUIET=1 "$src/scripts/fashion.sh" > "$out/log2" 2>&1 &&
   [ -f "$out/am_l1/model.pt" ] && [ -f "$out/ddpo/model.pt" ] && [ -f "$out/ddpo/checkpoint.pt" ] &&
   grep -q "resumed $out/am_l1" "$out/log2"; then
  pass "a rerun resumes a run killed after its checkpoint and restarts one killed before any"
else
  fail "rerun after killed runs: $(grep -E 'error|resumed' "$out/log2" | head -3)"
fi

# scripts/fashion_long.sh on the same base and classifiers: Adjoint Matching trained on in stages (2, then 10
# iterations: 10 sorts before 2 as text), each stage kept, sampled and scored.
long=$out/long
if TINY=1 NO_BUILD=1 TILT="$tilt" FASHION="$out" OUT="$long" THREADS=2 TILT_QUIET=1 "$src/scripts/fashion_long.sh" \
     > "$out/log3" 2>&1; then
  pass "scripts/fashion_long.sh TINY=1 ran"
else
  fail "scripts/fashion_long.sh TINY=1: $(tail -5 "$out/log3")"
fi
bad=""
for r in am am_sigma1; do
  for b in 2 10; do
    f="$long/$r/${b}_samples_n3_heun2.csv"
    [ -f "$long/$r/model_$b.pt" ] && [ -f "$f" ] && [ "$(($(wc -l < "$f") - 1))" = 30 ] || bad+=" $r@$b"
  done
done
[ -z "$bad" ] && pass "every stage of every run kept and sampled" || fail "stages missing:$bad"
rows=$(grep -c -E "^\| Adjoint Matching \(memoryless\) \| (2|10) \||^\| Adjoint Matching, sigma = 1 \| (2|10) \|" \
         "$long/fashion_long.md")
[ "$rows" = 4 ] && grep -q "^| base model | 0 |" "$long/fashion_long.md" && grep -q "^| target p" \
  "$long/fashion_long.md" \
  && grep -q "^| base model, sampled with the memoryless chain: Euler-Maruyama (as the runs train), K = 4 | 0 |" \
  "$long/fashion_long.md" && grep -q "^| floor: real images, 3 per class" "$long/fashion_long.md" \
  && pass "the long table has a row per stage, the base, its training chain, the floor and the target" \
  || fail "long table: $rows stage rows"
grep -q "^grid panels: base;am, 10 iterations;am_sigma1, 10 iterations$" "$out/log3" \
  && pass "the grid shows each run's stage of most iterations" || fail "grid: $(grep '^grid panels' "$out/log3")"
# A stage is the model a run of its length gives: 10 iterations straight, byte for byte the stage resumed from 2.
(cd "$src" && TINY=1 . scripts/fashion_settings.sh && "$tilt" finetune -c "$config" --set threads=2 \
   --set "base.path=$out/base/model.pt" "${tiny[@]}" --set "reward.path=$out/classifier/classifier.pt" \
   --set reward.lambda=5 --set 'finetune.lr_schedule="constant"' --set finetune.iterations=10 -q -o "$out/straight") \
   > "$out/log4" 2>&1
cmp -s "$out/straight/model.pt" "$long/am/model_10.pt" && pass "a stage resumed from the last is the run of its length" \
  || fail "the 10-iteration stage differs from 10 iterations straight: $(tail -2 "$out/log4")"
# Another seed of a run: its own folder and row, trained from that seed, scored with the rest, not in the grid.
if RUNS=am_seed3 BUDGETS=2 TINY=1 NO_BUILD=1 TILT="$tilt" FASHION="$out" OUT="$long" THREADS=2 TILT_QUIET=1 \
     "$src/scripts/fashion_long.sh" > "$out/log5" 2>&1 \
   && grep -q '"seed": 3' "$long/am_seed3/config.resolved.json" && [ -f "$long/am_seed3/2_samples_n3_heun2.csv" ] \
   && ! cmp -s "$long/am_seed3/model_2.pt" "$long/am/model_2.pt" \
   && grep -q "^| Adjoint Matching (memoryless), seed 3 | 2 |" "$long/fashion_long.md" \
   && grep -q "^grid panels: base;am, 10 iterations;am_sigma1, 10 iterations$" "$out/log5"; then
  pass "RUNS=am_seed3 trains am from seed 3 into a row of its own"
else
  fail "am_seed3: $(tail -3 "$out/log5"; grep 'seed' "$long/fashion_long.md")"
fi
for bad_env in "RUNS=nope" "RUNS=nope_seed1" "BUDGETS=4 2" "CHAINS=heun10"; do
  msg=$(env "$bad_env" TINY=1 NO_BUILD=1 TILT="$tilt" FASHION="$out" OUT="$out/bad" "$src/scripts/fashion_long.sh" 2>&1)
  [ $? != 0 ] && [[ $msg == "${bad_env%%=*}: "* ]] && [ ! -e "$out/bad" ] && pass "$bad_env is refused, naming it" \
    || fail "$bad_env: $msg"
done

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
