#!/usr/bin/env bash
# Conditional models on the command line (docs/conditions.md):
#  1. the generalisation claim, cheaply: Adjoint Matching over the 5 training conditions of
#     configs/conditions_2d.toml, then tilt sample (memoryless SDE and ODE) at the training, held-out and
#     outside conditions and tilt eval against the exact p*(. | c): the training and held-out medians must be
#     at most 2x the noise floor with both samplers, where the base is far off (the full claim, on random
#     problems, is scripts/conditions_study.sh);
#  2. every fine-tuning method takes the conditions from the config, and the model file records them;
#  3. what is refused, naming the flag, key or file;
#  4. conditional pretraining with condition dropout (the mixture and the digits), guidance on its model;
#     tilt eval-images of the class-conditional digits, per class.
# Usage: conditions_test.sh path/to/tilt path/to/configs   (~3-4 min on 2 cores)
set -uo pipefail
source "$(dirname "$(realpath "$0")")/lib.sh"
tilt=$(realpath "$1")
configs=$(realpath "$2")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

# 1. Training, held-out and outside conditions against the exact target (SKIP_CLAIM=1: parts 2 and 3 only).
if [ -z "${SKIP_CLAIM:-}" ]; then
printf -- '-1\n-0.5\n0\n0.5\n1\n-0.75\n-0.25\n0.25\n0.75\n-2\n-1.5\n1.5\n2\n' > all.csv
"$tilt" finetune -c "$configs/conditions_2d.toml" -o run -q --set finetune.iterations=1500 --set finetune.batch_size=128 \
  --set finetune.num_steps=40 --set finetune.checkpoint_every=500 > /dev/null 2>&1 || fail "finetune conditions_2d"
"$tilt" sample -m run/model.pt --conditions all.csv -n 1000 -o sde.csv > /dev/null 2>&1 || fail "sample sde"
"$tilt" sample -m run/model.pt --conditions all.csv -n 1000 --noise ode -o ode.csv > /dev/null 2>&1 || fail "sample ode"
"$tilt" sample --exact base -c "$configs/conditions_2d.toml" --conditions all.csv -n 1000 -o base.csv > /dev/null 2>&1 || fail "sample base"
"$tilt" eval -c "$configs/conditions_2d.toml" -s sde.csv ode.csv base.csv --json > eval.json 2> eval.err || fail "eval: $(cat eval.err)"
python3 - eval.json <<'PY' && pass "train and held-out medians <= 2x the floor (SDE and ODE); base > 10x" || fail "the generalisation claim"
import json, sys
r = json.load(open(sys.argv[1]))["samples"]
ok = True
for f in ("sde.csv", "ode.csv"):
    for s in ("train", "held_out", "outside"):
        v = r[f]["sets"][s]
        print(f"  {f} {s}: median {v['median_ratio']:.2f}, worst {v['worst_ratio']:.2f} over {v['conditions']}")
    for s in ("train", "held_out"):
        ok &= r[f]["sets"][s]["median_ratio"] <= 2.0
    ok &= len(r[f]["conditions"]) == 13 and all(row["n"] == 1000 for row in r[f]["conditions"])
for s in ("train", "held_out"):
    ok &= r["base.csv"]["sets"][s]["median_ratio"] > 10.0
sys.exit(0 if ok else 1)
PY
fi

# 2. Every method, from the config, on a tiny conditional problem; the file records the conditions.
{ tiny_config 0 1; cat <<'TOML'
[conditions]
train = [[-1.0], [1.0]]
[finetune]
hidden = [8]
num_steps = 6
batch_size = 8
iterations = 2
checkpoint_every = 2
[finetune.adjoint_matching]
loss_early_steps = 2
loss_late_steps = 2
TOML
} > tiny.toml
sed -i 's/^radius = 2.0$/radius = 2.0\nshift = [[1.0], [0.0]]/' tiny.toml
for m in adjoint_matching discrete_adjoint draft refl ddpo grpo ode_adjoint_matching; do
  extra=()
  [ "$m" = grpo ] && extra=(--set finetune.grpo.group_size=4)
  if "$tilt" finetune -c tiny.toml -o "m_$m" -q --set "finetune.method=$m" "${extra[@]}" > /dev/null 2> "m_$m.err" &&
     "$tilt" sample -m "m_$m/model.pt" -n 5 -o "m_$m.csv" > /dev/null 2>&1 &&
     [ "$(head -1 "m_$m.csv")" = "x0,x1,c0" ] && [ "$(tail -n +2 "m_$m.csv" | wc -l)" -eq 10 ]; then
    pass "$m takes [conditions]; sample draws 5 at each of the 2 recorded conditions"
  else
    fail "$m with conditions: $(head -c 400 "m_$m.err")"
  fi
done

# 3. Refusals.
{ tiny_config 0 1; printf '[finetune]\nhidden = [8]\nnum_steps = 6\nbatch_size = 8\niterations = 2\n'
  printf '[finetune.adjoint_matching]\nloss_early_steps = 2\nloss_late_steps = 2\n'; } > plain.toml
sed 's/^shift = .*$//' tiny.toml > no_shift.toml
grep -v '^train = \|^\[conditions\]' tiny.toml > no_conditions.toml
expect_error "a conditional base without [conditions]" "needs [conditions]" "$tilt" finetune -c no_conditions.toml -o bad1
expect_error "[conditions] with an unconditional base" "[base] is unconditional" "$tilt" finetune -c no_shift.toml -o bad2
expect_error "conditions of the wrong size" "conditions.train" "$tilt" finetune -c tiny.toml -o bad3 --set 'conditions.train=[[1.0, 2.0]]'
expect_error "two kinds of conditions" "exactly one of" "$tilt" finetune -c tiny.toml -o bad4 --set conditions.classes=2
expect_error "a non-finite condition file" "conditions.file" "$tilt" finetune -c no_conditions.toml -o bad5 \
  --set conditions.file=missing.csv
"$tilt" finetune -c plain.toml -o plain -q > /dev/null 2>&1
# A distribution of conditions: the uniform law on a box; the file then has no conditions to draw at.
sed 's/^train = \[\[-1.0\], \[1.0\]\]$/uniform = [[-1.0], [1.0]]/' tiny.toml > box.toml
if "$tilt" finetune -c box.toml -o box -q > /dev/null 2> box.err; then
  pass "[conditions] uniform: fine-tuning over a box of conditions"
else
  fail "[conditions] uniform: $(head -c 300 box.err)"
fi
expect_error "a model trained on a box needs --condition" "uniform box" "$tilt" sample -m box/model.pt -o bad.csv
expect_error "--condition for an unconditional model" "is unconditional" "$tilt" sample -m plain/model.pt --condition 1 -o bad.csv
expect_error "--guidance for an unconditional model" "is unconditional" "$tilt" sample -m plain/model.pt --guidance 1 -o bad.csv
expect_error "--condition of the wrong size" "takes 1" "$tilt" sample -m m_adjoint_matching/model.pt --condition 1,2 -o bad.csv
expect_error "--condition that is not a number" "--condition must be" "$tilt" sample -m m_adjoint_matching/model.pt --condition x -o bad.csv
# Conditions from a flag or a file are bounded as [conditions] is (1e300 was reported as damaged weights).
expect_error "--condition 1e300" "--condition must hold finite numbers of magnitude at most 1e+06" \
  "$tilt" sample -m m_adjoint_matching/model.pt --condition 1e300 -o bad.csv
printf '0.5\n-2e6\n' > huge_conditions.csv
expect_error "a conditions file with -2e6" "--conditions 'huge_conditions.csv' must hold finite numbers of magnitude" \
  "$tilt" sample -m m_adjoint_matching/model.pt --conditions huge_conditions.csv -o bad.csv
expect_error "[conditions] file with -2e6" "conditions.file" "$tilt" finetune -c no_conditions.toml -o bad5 \
  --set conditions.file=huge_conditions.csv
expect_error "--guidance without a null condition" "no null condition" "$tilt" sample -m m_adjoint_matching/model.pt --condition 1 --guidance 2 -o bad.csv
expect_error "exact samples of a conditional config need a condition" "--condition" "$tilt" sample --exact target -c tiny.toml -o bad.csv
"$tilt" sample -m plain/model.pt -n 20 -o plain.csv > /dev/null 2>&1
expect_error "unconditional samples against a conditional config" "no condition columns" "$tilt" eval -c tiny.toml -s plain.csv
"$tilt" sample --exact target -c tiny.toml --condition 0.5 -n 200 -o at.csv > /dev/null 2>&1
cut -d, -f1,2 at.csv > at_plain.csv
if "$tilt" eval -c tiny.toml -s at_plain.csv --condition 0.5 --json 2>/dev/null | grep -q '"condition":\[0.5\]'; then
  pass "eval --condition: a file without condition columns is measured at that condition"
else
  fail "eval --condition"
fi
expect_error "eval --condition on a file with its own conditions" "has condition columns" \
  "$tilt" eval -c tiny.toml -s at.csv --condition 0.5
# log Z at a condition, with the exact optimal control of that condition as the proposal: the weights are
# nearly constant and the estimate agrees with the closed form (the problem at c is an unconditional one).
"$tilt" logz -c tiny.toml --condition 0.5 --control optimal -n 2000 -q --json > logz.json 2> logz.err
python3 - logz.json <<'PY' && pass "logz --condition: exact log Z within 4 standard errors, ESS > 90%" || fail "logz --condition: $(cat logz.err)"
import json, sys
r = json.load(open(sys.argv[1]))
sys.exit(0 if abs(r["z_score"]) < 4 and r["ess_fraction"] > 0.9 else 1)
PY
expect_error "logz of a conditional config needs --condition" "give --condition" "$tilt" logz -c tiny.toml -n 100 -q
expect_absent "refusals write nothing" bad1 bad2 bad3 bad4 bad5 bad.csv

# 4. Conditional pretraining with condition dropout: tilt pretrain on the conditional mixture gives a model
#    with a null condition, so guidance works on it and on a fine-tune of it; the digits with their labels.
{ cat tiny.toml; printf '[pretrain]\nhidden = [8]\nbatch_size = 16\niterations = 3\ncheckpoint_every = 3\n'; } > pre.toml
if "$tilt" pretrain -c pre.toml -o pre -q > /dev/null 2> pre.err &&
   "$tilt" sample -m pre/model.pt -n 5 -o pre.csv > /dev/null 2>&1 &&
   [ "$(head -1 pre.csv)" = "x0,x1,c0" ] && [ "$(tail -n +2 pre.csv | wc -l)" -eq 10 ] &&
   "$tilt" sample -m pre/model.pt --condition 1 --guidance 2 -n 5 -o pre_g.csv > /dev/null 2>&1 &&
   [ "$(tail -n +2 pre_g.csv | wc -l)" -eq 5 ]; then
  pass "pretrain with [conditions]: the file records the 2 conditions, and --guidance 2 has a null condition"
else
  fail "conditional pretrain: $(head -c 400 pre.err)"
fi
sed -e 's/^type = "exact"$/type = "model"\npath = "pre\/model.pt"/' tiny.toml > from_pre.toml
if "$tilt" finetune -c from_pre.toml -o ft_pre -q > /dev/null 2> ft_pre.err &&
   "$tilt" sample -m ft_pre/model.pt --condition -1 --guidance 1 -n 5 -o ft_pre.csv > /dev/null 2>&1; then
  pass "fine-tuning a pretrained conditional model keeps its null condition (guidance after fine-tuning)"
else
  fail "fine-tune of a conditional pretrain: $(head -c 400 ft_pre.err)"
fi
# The exact conditional base with a null condition, the average over the training conditions ([base] null):
# guidance in training and after it, through the model file; refused without [data] shift or for a box.
if "$tilt" finetune -c tiny.toml -o ft_null -q --set 'base.null="average"' --set finetune.adjoint_matching.guidance=1 \
     > /dev/null 2> ft_null.err &&
   "$tilt" sample -m ft_null/model.pt --condition 1 --guidance 2 -n 5 -o ft_null.csv > /dev/null 2>> ft_null.err; then
  pass "[base] null = \"average\": the exact base guides, in training and from its model file"
else
  fail "[base] null = average: $(head -c 400 ft_null.err)"
fi
expect_error "base.null on a box of conditions" "'base.null' = \"average\" needs a finite set" \
  "$tilt" finetune -c box.toml -o bad_null -q --set 'base.null="average"'
grep -v '^train = \|^\[conditions\]\|^shift = ' tiny.toml > plain_exact.toml
expect_error "base.null of an unconditional base" "'base.null' needs a conditional base" \
  "$tilt" finetune -c plain_exact.toml -o bad_null2 -q --set 'base.null="average"'
# Guidance during fine-tuning (the three modes): full guidance trains from a base with a null condition;
# the flags need a weight, and a base without a null condition is refused with the key's name.
if "$tilt" finetune -c from_pre.toml -o ft_full -q --set finetune.adjoint_matching.guidance=2 \
     --set finetune.adjoint_matching.guidance_adjoint=true --set finetune.adjoint_matching.guidance_control=true \
     > /dev/null 2> ft_full.err && grep -q '"guidance_control": true' ft_full/config.resolved.json; then
  pass "fine-tuning with full guidance (trajectories, adjoint, control) records its keys"
else
  fail "fine-tune with full guidance: $(head -c 400 ft_full.err)"
fi
expect_error "guidance_adjoint without a weight" "'finetune.adjoint_matching.guidance_adjoint' needs guidance != 0" \
  "$tilt" finetune -c from_pre.toml -o bad_g1 -q --set finetune.adjoint_matching.guidance_adjoint=true
expect_error "guidance = 1e7" "'finetune.adjoint_matching.guidance' must be finite, of magnitude at most 1e+06" \
  "$tilt" finetune -c from_pre.toml -o bad_g2 -q --set finetune.adjoint_matching.guidance=1e7
expect_error "guidance on a base without a null condition" "needs a base with a null condition" \
  "$tilt" finetune -c tiny.toml -o bad_g3 -q --set finetune.adjoint_matching.guidance=1
expect_error "condition_dropout out of range" "pretrain.condition_dropout" \
  "$tilt" pretrain -c pre.toml -o bad6 -q --set pretrain.condition_dropout=1.0
grep -v '^train = \|^\[conditions\]' pre.toml > pre_no_conditions.toml
sed 's/^shift = .*$//' pre_no_conditions.toml > pre_plain.toml
expect_error "condition_dropout without [conditions]" "pretrain.condition_dropout" \
  "$tilt" pretrain -c pre_plain.toml -o bad7 -q --set pretrain.condition_dropout=0.2
expect_error "a moving [data] without [conditions] to pretrain on" "data.shift" "$tilt" pretrain -c pre_no_conditions.toml -o bad8 -q
digits_data="$(dirname "$configs")/data/digits/digits.csv.gz"
printf 'seed = 1\nthreads = 1\n[data]\ntype = "digits"\npath = "%s"\n[conditions]\nclasses = 10\n[pretrain]\nhidden = [16]\nbatch_size = 16\niterations = 2\ncheckpoint_every = 2\n' \
  "$digits_data" > digits.toml
if "$tilt" pretrain -c digits.toml -o dpre -q > /dev/null 2> dpre.err &&
   "$tilt" sample -m dpre/model.pt --condition 0,0,0,1,0,0,0,0,0,0 --guidance 4 --steps 4 -n 2 -o dpre.csv > /dev/null 2>&1 &&
   [ "$(head -1 dpre.csv | tr ',' '\n' | grep -c '^c')" -eq 10 ]; then
  pass "digits pretrain conditioned on their labels (classes = 10), sampled with guidance"
else
  fail "conditional digits pretrain: $(head -c 400 dpre.err)"
fi
# r(x, c) = log p(c | x) of each sample's own class: fine-tune the class-conditional digits model over all ten.
{ cat digits.toml; printf '[classifier]\nhidden = [16]\niterations = 2\nbatch_size = 16\n'
  printf '[base]\ntype = "model"\npath = "dpre/model.pt"\n[reward]\ntype = "classifier"\npath = "cls/classifier.pt"\nclass = "condition"\n'
  printf '[finetune]\nhidden = [8]\nnum_steps = 6\nbatch_size = 8\niterations = 2\n[finetune.adjoint_matching]\nloss_early_steps = 2\nloss_late_steps = 2\n'
} > digits_ft.toml
if "$tilt" classifier -c digits_ft.toml -o cls -q > /dev/null 2> cls.err &&
   "$tilt" finetune -c digits_ft.toml -o dft -q > /dev/null 2>> cls.err &&
   "$tilt" sample -m dft/model.pt --condition 0,0,0,0,0,0,0,1,0,0 --steps 4 -n 2 -o dft.csv > /dev/null 2>&1; then
  pass "digits fine-tuned over all ten classes with r(x, c) = log p(c | x) (class = \"condition\")"
else
  fail "conditional classifier reward: $(head -c 400 cls.err)"
fi
# The same with a class-conditional U-Net (network = "unet") fine-tuned by LoRA adapters (model = "lora"); LoRA on the
# MLP base is refused naming the key.
sed 's/^hidden = \[16\]$/network = "unet"\nchannels = 4\nchannel_mult = [1, 2]\nblocks = 1\ngroups = 2\ntime_features = 4/' \
  digits.toml > unet.toml
{ cat unet.toml; printf '[base]\ntype = "model"\npath = "upre/model.pt"\n[reward]\ntype = "classifier"\npath = "cls/classifier.pt"\nclass = "condition"\n'
  printf '[finetune]\nmodel = "lora"\nlora_rank = 2\nnum_steps = 6\nbatch_size = 8\niterations = 2\n[finetune.adjoint_matching]\nloss_early_steps = 2\nloss_late_steps = 2\n'
} > unet_ft.toml
if "$tilt" pretrain -c unet.toml -o upre -q > /dev/null 2> upre.err &&
   "$tilt" finetune -c unet_ft.toml -o uft -q > /dev/null 2>> upre.err &&
   "$tilt" sample -m uft/model.pt --condition 0,0,0,0,0,0,0,1,0,0 --guidance 2 --steps 4 -n 2 -o uft.csv > /dev/null 2>> upre.err &&
   [ "$(wc -l < uft.csv)" -eq 3 ]; then
  pass "a class-conditional U-Net pretrained on the digits, fine-tuned with LoRA, sampled with guidance"
else
  fail "U-Net and LoRA: $(head -c 400 upre.err)"
fi
# The LoRA model file holds the base once (base + adapters, not base + base + adapters), and exports to TorchScript
# (tilt export checks the module against tilt's velocity at conditions and at the null condition before writing).
if [ -f uft/model.pt ] && [ "$(stat -c %s uft/model.pt)" -lt "$(($(stat -c %s upre/model.pt) * 3 / 2))" ] &&
   "$tilt" export -m uft/model.pt -o uft.ts > /dev/null 2> uexp.err && [ -s uft.ts ]; then
  pass "a LoRA model file stores its base once; tilt export writes the U-Net with LoRA as TorchScript"
else
  fail "LoRA file size $(stat -c %s uft/model.pt 2>/dev/null) vs base $(stat -c %s upre/model.pt 2>/dev/null), or export: $(head -c 400 uexp.err 2>/dev/null)"
fi
# precision = "bfloat16": the same fine-tuning under bfloat16 autocast, recorded in config.resolved.json; resumed in
# float32 (precision may change on resume); an unknown precision names the key.
if "$tilt" finetune -c unet_ft.toml --set finetune.precision=bfloat16 -o uft16 -q > /dev/null 2> u16.err &&
   grep -q '"precision": "bfloat16"' uft16/config.resolved.json &&
   "$tilt" finetune -c unet_ft.toml --set finetune.iterations=3 -o uft16 -q --resume > /dev/null 2>> u16.err &&
   [ "$(wc -l < uft16/metrics.jsonl)" -eq 3 ]; then
  pass "the U-Net with LoRA fine-tuned under bfloat16 autocast, then resumed in float32"
else
  fail "precision = bfloat16: $(head -c 400 u16.err)"
fi
# tilt sample --precision bfloat16: the same draws through bfloat16 convolutions; the samples stay near the float32
# ones (relative to their spread) but not equal (autocast acted).
if "$tilt" sample -m uft/model.pt --condition 0,0,0,0,0,0,0,1,0,0 --steps 4 -n 64 -o s32.csv > /dev/null 2> s16.err &&
   "$tilt" sample -m uft/model.pt --condition 0,0,0,0,0,0,0,1,0,0 --steps 4 -n 64 --precision bfloat16 -o s16.csv > /dev/null 2>> s16.err &&
   python3 -c "
import csv
rows = lambda f: [[float(v) for v in r] for r in list(csv.reader(open(f)))[1:]]
a, b = rows('s32.csv'), rows('s16.csv')
d = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
spread = max(abs(x) for r in a for x in r)
assert 0 < d < 0.05 * spread, (d, spread)
"; then
  pass "tilt sample --precision bfloat16 draws near the float32 samples, not equal to them"
else
  fail "sample --precision: $(head -c 400 s16.err)"
fi
expect_error "sample: an unknown --precision" "--precision: unknown precision 'half'" \
  "$tilt" sample -m uft/model.pt --condition 0,0,0,0,0,0,0,1,0,0 -n 2 --precision half -o bad.csv
expect_error "an unknown precision names the key" "finetune.precision" \
  "$tilt" finetune -c unet_ft.toml --set finetune.precision=fp16 -o bad_precision -q
expect_error "LoRA on an MLP base" "finetune.model" "$tilt" finetune -c digits_ft.toml -o bad_lora -q --set finetune.model=lora
# tilt_guidance_study (built with the benchmarks): the lean adjoint's norm along guided trajectories of the
# digits model, a row per w and adjoint (the unguided one only at w = 0), and its JSON.
study="$(dirname "$tilt")/../bench/tilt_guidance_study"
if [ -x "$study" ]; then
  if "$study" -c digits_ft.toml --w 0,2 --batch 4 --steps 6 --threads 1 --json gstudy.json > gstudy.md 2> gstudy.err &&
     [ "$(grep -c '^| [02] |' gstudy.md)" -eq 3 ] &&
     python3 -c "import json; r = json.load(open('gstudy.json'))['runs']; assert len(r) == 3 and all(len(x['norm']) == 7 for x in r)"; then
    pass "tilt_guidance_study: the adjoint's norm per w, unguided and guided"
  else
    fail "tilt_guidance_study: $(head -c 400 gstudy.err)"
  fi
  out=$("$study" -c tiny.toml --w 1 --steps 4 --batch 2 2>&1); rc=$?
  if [ $rc -eq 1 ] && grep -qF "null condition" <<<"$out"; then
    pass "tilt_guidance_study refuses guidance on a base without a null condition"
  else
    fail "tilt_guidance_study on a base without a null condition (rc=$rc): ${out:0:300}"
  fi
fi
# tilt eval-images by condition: a row per class, the summary over classes, the target per class, an unseen
# classifier of another width, depth, activation and seed; a fixed class with condition columns is by condition too.
"$tilt" classifier -c digits_ft.toml -o cls2 -q --set seed=5 --set 'classifier.hidden=[12, 8]' \
  --set classifier.activation=\"relu\" > /dev/null 2>> cls.err
if "$tilt" sample -m dft/model.pt --steps 4 -n 3 -o dall.csv > /dev/null 2>&1 &&
   "$tilt" eval-images -c digits_ft.toml -s dall.csv --base dall.csv --unseen cls2/classifier.pt --json > dall.json 2> dall.err &&
   "$tilt" eval-images -c digits_ft.toml -s dall.csv --unseen cls2/classifier.pt > dall.txt 2>> dall.err &&
   [ "$(grep -c '^ *[0-9] *3 ' dall.txt)" -eq 10 ] &&
   "$tilt" eval-images -c digits_ft.toml --set reward.class=3 -s dall.csv --json > dall3.json 2>> dall.err &&
   python3 - dall.json dall3.json <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
s = r["samples"]["dall.csv"]
rows = s["classes"]
assert r["by_condition"] and [row["class"] for row in rows] == list(range(10)), s
assert all(row["n"] == 3 and 0 <= row["class_share"] <= 1 and row["frechet"] >= 0 and "unseen" in row for row in rows), s
m = s["summary"]
assert m["classes"] == 10 and m["n"] == 30 and abs(m["class_share"] - sum(row["class_share"] for row in rows) / 10) < 1e-12, m
assert abs(m["frechet"] - sum(row["frechet"] for row in rows) / 10) < 1e-9, m
assert m["worst_class_share"] == min(row["class_share"] for row in rows) and "unseen" in m, m
assert len(r["real"]["classes"]) == 10 and len(r["target"]["classes"]) == 10 and r["unseen_classifier"] == "cls2/classifier.pt"
assert json.load(open(sys.argv[2]))["samples"]["dall.csv"]["summary"]["classes"] == 10
# The floor: 3 real images of each class (the first file's counts), scored as samples are.
f = r["floor"]
assert f["counts_of"] == "dall.csv" and [row["n"] for row in f["classes"]] == [3] * 10 and f["summary"]["n"] == 30, f
assert f["summary"]["frechet"] > r["real"]["summary"]["frechet"] + 1e-6 and "unseen" in f["summary"], f
PY
then
  pass "eval-images by condition: a row per class, the summary, the target and the unseen classifier"
else
  fail "eval-images by condition: $(head -c 600 dall.err)"
fi
if "$tilt" plot --images 8x8 --by-condition 3 dall.csv:ft dpre.csv:pre -o dgrid.png > /dev/null 2>&1 && [ -s dgrid.png ]; then
  pass "plot --images --by-condition: one row per class"
else
  fail "plot --by-condition"
fi
cut -d, -f1-64 dall.csv > dplain.csv
awk -F, -v OFS=, 'NR == 3 { $65 = 0.5 } { print }' dall.csv > dhalf.csv
cut -d, -f1-66 dall.csv > dtwo.csv
"$tilt" sample -m dft/model.pt --steps 4 -n 1 -o done.csv > /dev/null 2>&1
expect_error "eval-images: class = \"condition\" needs condition columns" "'dplain.csv' has no condition columns" \
  "$tilt" eval-images -c digits_ft.toml -s dall.csv dplain.csv
expect_error "eval-images: a condition that is no class's one-hot row" "'dhalf.csv': the condition of sample 2 is not the one-hot" \
  "$tilt" eval-images -c digits_ft.toml -s dhalf.csv
expect_error "eval-images: conditions of the wrong size" "'dtwo.csv' has conditions of 2 numbers" \
  "$tilt" eval-images -c digits_ft.toml -s dtwo.csv
expect_error "eval-images: one sample of a class" "'done.csv' has 1 sample of class 0" \
  "$tilt" eval-images -c digits_ft.toml -s done.csv
expect_error "eval-images: a missing unseen classifier" "nope.pt" \
  "$tilt" eval-images -c digits_ft.toml -s dall.csv --unseen nope.pt
expect_error "classifier: an activation it does not know" "classifier.activation" \
  "$tilt" classifier -c digits_ft.toml -o bad11 -q --set classifier.activation=\"gelu\"
expect_error "plot --by-condition of a file without condition columns" "'dplain.csv' has no condition columns" \
  "$tilt" plot --images 8x8 --by-condition 3 dall.csv dplain.csv -o dbad.png
expect_error "class = a word other than condition" "reward.class" \
  "$tilt" finetune -c digits_ft.toml -o bad10 -q --set reward.class=\"all\"
expect_error "digits with classes that are not theirs" "conditions.classes" \
  "$tilt" pretrain -c digits.toml -o bad9 -q --set conditions.classes=5
expect_absent "pretraining refusals write nothing" bad6 bad7 bad8 bad9 bad10 bad11

finish
