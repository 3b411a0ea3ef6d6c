#!/usr/bin/env bash
# The tilt command line: a short run end to end, resume, eval --json, and the errors users meet
# (each must name the problem and leave earlier files intact). Usage: cli_test.sh path/to/tilt configs/
set -uo pipefail
source "$(dirname "$(realpath "$0")")/lib.sh"  # tiny_config (this script keeps its own checks below)
tilt=$(realpath "$1")
configs=$(realpath "$2")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
failures=0

pass() { echo "ok   $1"; }
fail() { echo "FAIL $1"; failures=$((failures + 1)); }

# expect_error NAME "text the message must contain" command...
expect_error() {
  local name=$1 text=$2; shift 2
  local out
  out=$("$@" 2>&1); local rc=$?
  if [ $rc -ne 0 ] && grep -qF -- "$text" <<<"$out"; then pass "$name"; else fail "$name (rc=$rc): $out"; fi
}

# A small, fast version of the demo, with the paper's defaults for the keys it does not give (the tests of the
# run's machinery below assume them: a constant lr, the control weighting); tiny_auto.toml leaves the default preset.
{ tiny_config 1 2; cat <<'TOML'
[finetune]
preset = "paper"
hidden = [32, 32]
num_steps = 20
batch_size = 32
iterations = 20
loss_early_steps = 5
loss_late_steps = 5
clip_factor = 0.0
lr = 1e-3
checkpoint_every = 5
TOML
} > tiny.toml
grep -v '^preset' tiny.toml > tiny_auto.toml

# 1. A run end to end.
if "$tilt" finetune -q -c tiny.toml -o run > log.txt 2>&1 && [ -f run/model.pt ] && [ -f run/checkpoint.pt ] &&
   [ "$(wc -l < run/metrics.jsonl)" -eq 20 ] && [ -f run/config.resolved.json ] && [ -f run/training_loss.png ]; then
  pass "finetune writes model, checkpoint, 20 metrics lines, resolved config, curves"
else
  fail "finetune run: $(cat log.txt)"
fi

# Adjoint Matching's label-free convergence signals: the rollout's ess and log_z, the loss's window quantiles, plotted.
if python3 - run/metrics.jsonl <<'PY' && [ -f run/training_ess.png ] && [ -f run/training_loss_median.png ]
import json, sys
for line in open(sys.argv[1]):
    j = json.loads(line)
    assert 0 < j["ess"] <= 1 and "log_z" in j, j
    assert j["loss_q10"] <= j["loss_median"] <= j["loss_q90"], j
PY
then
  pass "finetune writes ess, log_z and the loss's median and quantiles, and plots ess and loss_median"
else
  fail "finetune: no ess, log_z or loss window in run/metrics.jsonl, or no training_ess.png"
fi

# A TILT_GEMM that cannot be honoured stops the run before anything is written; aten gives a run.
expect_error "TILT_GEMM=bogus is an error naming it" "TILT_GEMM must be 'auto', 'onednn' or 'aten', got 'bogus'" \
  env TILT_GEMM=bogus "$tilt" finetune -q -c tiny.toml -o run_gemm
[ ! -e run_gemm ] && pass "TILT_GEMM=bogus writes nothing" || fail "TILT_GEMM=bogus left run_gemm behind"
expect_error "TILT_MALLOC=bogus is an error naming it" "TILT_MALLOC must be unset or 'system', got 'bogus'" \
  env TILT_MALLOC=bogus "$tilt" finetune -q -c tiny.toml -o run_malloc
[ ! -e run_malloc ] && pass "TILT_MALLOC=bogus writes nothing" || fail "TILT_MALLOC=bogus left run_malloc behind"
if env TILT_GEMM=aten "$tilt" finetune -q -c tiny.toml --set finetune.iterations=3 -o run_aten > log.txt 2>&1 &&
   [ -f run_aten/model.pt ]; then
  pass "TILT_GEMM=aten trains"
else
  fail "TILT_GEMM=aten: $(cat log.txt)"
fi

# 2. Resume with more iterations continues from the checkpoint.
if "$tilt" finetune -q -c tiny.toml --set finetune.iterations=30 -o run --resume > log.txt 2>&1 &&
   grep -q "resumed run at iteration 20" log.txt && [ "$(wc -l < run/metrics.jsonl)" -eq 30 ]; then
  pass "resume continues at iteration 20 and appends metrics up to 30"
else
  fail "resume: $(cat log.txt)"
fi

# Early stop on an ESS plateau (early_stop = "ess"): with windows of 2 and a tolerance of 100% the first check that
# finds the last 2 ESS values' median at most twice the 2 before's stops the run, N < 20. It ends as a last iteration
# would: the checkpoint at N, a model that samples, N metrics lines, the last saying why. A resume stops again at
# once; with early_stop = "off" it trains on to 20.
early=(--set finetune.early_stop=ess --set finetune.early_stop_window=2 --set finetune.early_stop_tolerance=1)
if "$tilt" finetune -q -c tiny.toml "${early[@]}" -o early > log.txt 2>&1 && [ -f early/model.pt ] &&
   n=$(python3 - early/metrics.jsonl <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
n = len(lines)
assert 4 <= n < 20, n
assert lines[-1]["early_stop"].startswith("stopped early at iteration %d: the ess has plateaued" % n), lines[-1]
assert not any("early_stop" in j for j in lines[:-1])
print(n)
PY
) && grep -q "stopped early at iteration $n" log.txt &&
   "$tilt" sample -m early/model.pt -n 50 --steps 20 -o early.csv > /dev/null 2>&1 &&
   "$tilt" finetune -q -c tiny.toml "${early[@]}" -o early --resume > log2.txt 2>&1 &&
   grep -q "nothing to resume" log2.txt && [ "$(wc -l < early/metrics.jsonl)" -eq "$n" ] &&
   "$tilt" finetune -q -c tiny.toml --set finetune.early_stop=off -o early --resume > log3.txt 2>&1 &&
   [ "$(wc -l < early/metrics.jsonl)" -eq 20 ]; then
  pass "early_stop = \"ess\" stops at iteration $n with its checkpoint, a model and the reason; resume stops again, or trains on with it off"
else
  fail "early stop: $(cat log.txt log2.txt log3.txt 2>/dev/null)"
fi
expect_error "early_stop needs a method that reports the ESS" \
  "'finetune.early_stop' is \"ess\", but method = \"draft\" reports no ESS" \
  "$tilt" finetune -q -c tiny.toml --set finetune.method=draft --set finetune.early_stop=ess -o early_draft
expect_error "early_stop_window is checked" "'finetune.early_stop_window' must be in 1..1000000, got 0" \
  "$tilt" finetune -q -c tiny.toml --set finetune.early_stop=ess --set finetune.early_stop_window=0 -o early_bad

# Regression warnings: a tiny clip_factor clips every term, and after 20 such iterations finetune warns (on stderr and
# in that iteration's metrics line); the demo's settings (60 iterations of them) warn of nothing.
if "$tilt" finetune -q -c tiny.toml --set finetune.clip_factor=1e-9 --set finetune.iterations=25 -o clipped > log.txt 2>&1 &&
   grep -q "warning: over half of the loss terms are clipped in each of the last 20 iterations" log.txt &&
   [ "$(grep -c '"warning":"over half of the loss terms are clipped' clipped/metrics.jsonl)" -eq 1 ] &&
   grep -q '"loss_top_share"' clipped/metrics.jsonl; then
  pass "a tiny clip_factor warns once that most terms are clipped, on stderr and in metrics.jsonl"
else
  fail "clip warning: $(cat log.txt)"
fi
if "$tilt" finetune -q -c "$configs/demo_2d.toml" --set threads=1 --set finetune.iterations=60 -o demo60 > log.txt 2>&1 &&
   ! grep -q "warning" log.txt && ! grep -q '"warning"' demo60/metrics.jsonl; then
  pass "the demo's settings warn of nothing (no clipping, no domination by a few rows)"
else
  fail "demo warnings: $(cat log.txt)"
fi

# 3. Sampling, exact target samples, eval --json.
"$tilt" sample -m run/model.pt -n 500 --steps 50 -o s.csv --png s.png > /dev/null 2>&1 &&
  "$tilt" sample -m run/model.pt -n 500 --noise ode --steps 50 -o ode.csv > /dev/null 2>&1 &&
  "$tilt" sample --exact target -c tiny.toml -n 500 -o target.csv > /dev/null 2>&1 &&
  [ -f s.png ] && pass "sample (SDE, ODE, exact target) and --png" || fail "sample"
# --batch: the ODE's samples drawn 7 at a time are 500 rows, and a batch of n or more is the one draw of all n.
"$tilt" sample -m run/model.pt -n 500 --noise ode --steps 50 --batch 7 -o ode7.csv > /dev/null 2>&1 &&
  "$tilt" sample -m run/model.pt -n 500 --noise ode --steps 50 --batch 500 -q -o ode500.csv > /dev/null 2>&1 &&
  [ "$(wc -l < ode7.csv)" = 501 ] && cmp -s ode500.csv ode.csv && ! cmp -s ode7.csv ode.csv &&
  pass "sample --batch" || fail "sample --batch"
expect_error "sample --batch -1" "--batch must be in 0..10000000" "$tilt" sample -m run/model.pt --batch -1 -o x.csv
if "$tilt" eval -c tiny.toml -s s.csv -s target.csv --json --replicates 2 > eval.json 2> log.txt &&
   python3 - eval.json <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["target"]["kind"] == "exact"
for path, s in r["samples"].items():
    for key in ("energy_distance", "energy_distance_noise_floor", "energy_distance_ratio", "mmd", "mean_reward"):
        assert key in s, key
assert r["samples"]["target.csv"]["energy_distance_ratio"] < 3.0
PY
then pass "eval --json prints one JSON object with the distances"; else fail "eval --json: $(cat log.txt eval.json)"; fi
"$tilt" plot -o fig.png s.csv:model target.csv:target > /dev/null 2>&1 && [ -f fig.png ] && pass "plot" || fail "plot"
# --max-n: a file of more rows is scored on that many (the JSON says how many of how many); a smaller one whole.
head -n 301 s.csv > s300.csv
if "$tilt" eval -c tiny.toml -s s.csv -s s300.csv --json --replicates 2 --max-n 400 > maxn.json 2> log.txt &&
   "$tilt" eval -c tiny.toml -s s.csv --replicates 2 --max-n 400 > maxn.txt 2>> log.txt &&
   python3 - maxn.json <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["max_n"] == 400, r
assert (r["samples"]["s.csv"]["n"], r["samples"]["s.csv"]["file_rows"]) == (400, 500), r
assert (r["samples"]["s300.csv"]["n"], r["samples"]["s300.csv"]["file_rows"]) == (300, 300), r
# the floor is that of the rows scored: (2/n) E|X - X'|
f400, f300 = (r["samples"][p]["energy_distance_noise_floor"] for p in ("s.csv", "s300.csv"))
assert 1.1 < f300 / f400 < 1.5, (f300, f400)
PY
   grep -qF -- "--max-n 400: files of more rows are scored on 400 of them" maxn.txt
then pass "eval --max-n scores 400 of 500 rows and says so"; else fail "eval --max-n: $(cat log.txt maxn.json maxn.txt)"; fi
expect_error "eval --max-n 0" "--max-n must be in 2..10000000" "$tilt" eval -c tiny.toml -s s.csv --max-n 0
expect_error "eval --max-n -5" "--max-n must be in 2..10000000" "$tilt" eval -c tiny.toml -s s.csv --max-n -5
expect_error "eval --max-n abc" "--max-n" "$tilt" eval -c tiny.toml -s s.csv --max-n abc
expect_error "eval --max-n 1" "--max-n must be in 2..10000000" "$tilt" eval -c tiny.toml -s s.csv --max-n 1
head -n 2 s.csv > one.csv
expect_error "eval of a file of 1 sample" "samples file 'one.csv' has 1 sample: the noise floor needs at least 2" \
  "$tilt" eval -c tiny.toml -s one.csv

# 4. Errors that name the problem.
cp tiny.toml typo.toml && sed -i 's/^lr = 1e-3/lrr = 1e-3/' typo.toml
expect_error "unknown key is named, with a suggestion" "unknown key 'finetune.lrr' (did you mean 'finetune.lr'?)" \
  "$tilt" finetune -c typo.toml -o typo
expect_error "wrong type is named" "'finetune.iterations' must be an integer, got a string" \
  "$tilt" finetune -c tiny.toml --set finetune.iterations=many -o wrongtype
expect_error "unknown noise schedule" "unknown noise schedule 'brownian'" \
  "$tilt" finetune -c tiny.toml --set finetune.noise=brownian -o badnoise
expect_error "missing config file" "cannot read config file 'absent.toml'" \
  "$tilt" finetune -c absent.toml -o x
expect_error "missing model file" "cannot read model file 'absent.pt': no such file" \
  "$tilt" sample -m absent.pt -o x.csv
echo "garbage" > corrupt.pt
expect_error "corrupt model file" "cannot read model file 'corrupt.pt': not a tilt model file, or corrupt" \
  "$tilt" sample -m corrupt.pt -o x.csv
expect_error "dimension mismatch in reward" "'reward.center' must have 2 entries" \
  "$tilt" finetune -c tiny.toml --set 'reward.center=[1,2,3]' -o dims
# tiny.toml's 5 + 5 loss steps on 10 steps: the step at t = 0 has no target, so only 9 can be (before any run folder).
expect_error "loss steps beyond the trainable ones" "loss_late_steps' must be at most num_steps - 1 - loss_early_steps = 4" \
  "$tilt" finetune -c tiny.toml --set finetune.num_steps=10 -o allsteps
expect_error "no loss steps" "loss_early_steps + loss_late_steps must be at least 1" \
  "$tilt" finetune -c tiny.toml --set finetune.loss_early_steps=0 --set finetune.loss_late_steps=0 -o nosteps
[ ! -e typo ] && [ ! -e wrongtype ] && [ ! -e dims ] && [ ! -e allsteps ] && [ ! -e nosteps ] && pass "failed configs create no run directory" || fail "stray run directory"

# 5. A finished run is never overwritten.
before=$(md5sum run/model.pt run/checkpoint.pt)
expect_error "refuses to overwrite a run" "already holds a run; use --resume" "$tilt" finetune -c tiny.toml -o run
[ "$before" = "$(md5sum run/model.pt run/checkpoint.pt)" ] && pass "earlier run untouched" || fail "earlier run changed"
expect_error "resume with a different model" "the configuration differs" \
  "$tilt" finetune -q -c tiny.toml --set 'finetune.hidden=[16]' -o run --resume

# 6. Divergence: a NaN stops training with a message, and what was written before survives. A healthy
# run writes a checkpoint and a model; resuming it with an absurd learning rate diverges (the largest
# that docs/config.md allows, lr = 1, with Adam's moment averaging off); a resume with a sane one
# continues from the healthy checkpoint.
"$tilt" finetune -q -c tiny.toml --set finetune.checkpoint_every=2 --set finetune.iterations=2 -o nan > /dev/null 2>&1
before=$(md5sum nan/model.pt nan/checkpoint.pt)
out=$("$tilt" finetune -q -c tiny.toml --set finetune.checkpoint_every=100 --set finetune.iterations=6 \
      --set finetune.lr=1 --set finetune.beta1=0 --set finetune.beta2=0 --set finetune.grad_clip=0.0 -o nan --resume 2>&1); rc=$?
if [ $rc -ne 0 ] && grep -qE "not finite|is (nan|inf|-inf)" <<<"$out" && grep -q "is intact" <<<"$out" &&
   [ "$before" = "$(md5sum nan/model.pt nan/checkpoint.pt)" ]; then
  pass "a NaN stops the run with a message; the earlier checkpoint and model are untouched"
  if "$tilt" finetune -q -c tiny.toml --set finetune.checkpoint_every=100 --set finetune.iterations=6 \
       --set finetune.grad_clip=0.0 -o nan --resume > log.txt 2>&1 && grep -q "resumed nan at iteration 2" log.txt &&
     [ "$(wc -l < nan/metrics.jsonl)" -eq 6 ]; then
    pass "resume after the NaN with a sane lr continues from the healthy checkpoint"
  else
    fail "resume after NaN: $(cat log.txt)"
  fi
else
  fail "NaN handling (rc=$rc): $out"
fi

# A run started before [finetune] preset, dsm_until, dsm_rollout(_steps), buffer_*, integrator and target existed (its
# config.resolved.json has none of them) resumes: it was run with what their defaults did, and a config that gives
# no preset (tiny_auto.toml) keeps the paper's for it; asking for another preset on resume is a change of problem,
# refused naming the key.
python3 -c "
import json
p = 'nan/config.resolved.json'; j = json.load(open(p)); f = j['finetune']
del f['preset']
am = f.get('adjoint_matching', f)
for key in ('dsm_until', 'dsm_rollout', 'dsm_rollout_steps', 'buffer_size', 'buffer_passes', 'buffer_weights',
            'integrator', 'target'):
    del am[key]
json.dump(j, open(p, 'w'))"
expect_error "resume with another preset" "finetune.preset" \
  "$tilt" finetune -q -c tiny.toml --set finetune.preset=small --set finetune.iterations=7 -o nan --resume
if "$tilt" finetune -q -c tiny_auto.toml --set finetune.iterations=7 --set finetune.grad_clip=0.0 -o nan --resume \
     > log.txt 2>&1 && grep -q "resumed nan at iteration 6" log.txt; then
  pass "a run from before finetune.preset, dsm_until, dsm_rollout and buffer_* resumes"
else
  fail "resume of a run without finetune.preset or dsm_rollout: $(cat log.txt)"
fi

# preset = "auto", the default: on this 2-D mixture "small", recorded as such; the keys the config gives win, the
# others take the preset's values; a resume whose config gives no preset keeps the run's.
if "$tilt" finetune -q -c tiny_auto.toml --set finetune.iterations=2 -o auto > log.txt 2>&1 &&
   python3 - auto/config.resolved.json <<'PY' &&
import json, sys
f = json.load(open(sys.argv[1]))["finetune"]
am = f["adjoint_matching"]
assert f["preset"] == "small" and f["lr"] == 1e-3 and f["lr_schedule"] == "cosine" and f["num_steps"] == 20, f
assert am["dsm_until"] == 0.5 and am["loss_weighting"] == "velocity", am
assert f.get("loss_early_steps", am.get("loss_early_steps")) == 5, f  # given (flat), not the preset's 20 / 3
PY
   "$tilt" finetune -q -c tiny_auto.toml --set finetune.iterations=3 -o auto --resume > log.txt 2>&1 &&
   grep -q "resumed auto at iteration 2" log.txt; then
  pass "preset = \"auto\" is \"small\" on a 2-D mixture, recorded, and kept on resume"
else
  fail "preset = \"auto\": $(cat log.txt; cat auto/config.resolved.json)"
fi
# "small" trains on 20 exact steps now; a run started when it meant 60 Euler steps (its record says integrator =
# "euler") resumes on its own chain, with the preset kept or given (a record edited to read as such a run).
python3 - auto/config.resolved.json <<'PY'
import json, sys
p = sys.argv[1]; j = json.load(open(p)); am = j["finetune"]["adjoint_matching"]
assert am["integrator"] == "exact" and am["dsm_rollout_steps"] == 120, am
am["integrator"] = "euler"
json.dump(j, open(p, "w"))
PY
if "$tilt" finetune -q -c tiny_auto.toml --set finetune.iterations=4 -o auto --resume > log.txt 2>&1 &&
   grep -q "resumed auto at iteration 3" log.txt &&
   "$tilt" finetune -q -c tiny_auto.toml --set finetune.preset=small --set finetune.iterations=5 -o auto --resume \
     > log.txt 2>&1 && grep -q "resumed auto at iteration 4" log.txt; then
  pass "a run of preset = \"small\" from before its exact chain resumes on its Euler chain"
else
  fail "resume of a K = 60-era preset small run: $(cat log.txt)"
fi
# configs/untuned_4d.toml (README, "A new user's problem, with the defaults"): an empty [finetune] is "small" there.
if "$tilt" finetune -q -c "$configs/untuned_4d.toml" --set threads=1 --set finetune.iterations=1 -o untuned > log.txt 2>&1 &&
   grep -q '"preset": "small"' untuned/config.resolved.json && ! grep -q "warning" log.txt; then
  pass "configs/untuned_4d.toml: the defaults are preset = \"small\"'s, without a warning"
else
  fail "configs/untuned_4d.toml: $(cat log.txt)"
fi

# tilt soc: a short comparison of two losses on an SOC benchmark problem.
if "$tilt" soc -q --problem linear_ou -l adjoint_matching -l cross_entropy --iterations 10 --eval-every 5 \
     --eval-batch 64 --batch 32 --hidden 16 --threads 2 --json -o soc > soc.json 2> soc.log &&
   python3 -c "
import json, sys
s = json.load(open('soc.json'))
assert s['problem'] == 'linear_ou' and set(s['losses']) == {'adjoint_matching', 'cross_entropy'}, s
for name, row in s['losses'].items():
    assert row['control_l2_error'] > 0 and row['initial_control_l2_error'] > 0, row
    assert len(open('soc/' + name + '.eval.jsonl').read().splitlines()) == 3
assert 'optimal_value' in s
# u*'s own Euler objective on the evaluation's paths, what the losses' objectives are to be compared with (the same
# noise): -2.90 against V = -3.12 on these 64 paths (-3.13 on 8192), where the trained controls are still near 0.1.
assert abs(s['optimal_objective_on_grid'] - s['optimal_value']) < 0.1 * abs(s['optimal_value']), s
" && [ -s soc/curves.png ] && grep -q "the optimal control's own objective" soc/summary.md; then
  pass "soc: two losses, JSON summary, eval curves and PNG"
else
  fail "soc run: $(cat soc.log soc.json)"
fi
# A problem without ground truth: the control objective only.
if "$tilt" soc -q --problem molecular_dynamics -l log_variance -l moment --iterations 4 --eval-every 2 \
     --eval-batch 64 --batch 16 --hidden 8 --threads 2 --json -o soc_md > soc_md.json 2> soc_md.log &&
   python3 -c "
import json
s = json.load(open('soc_md.json'))
for name, row in s['losses'].items():
    assert 'control_l2_error' not in row and row['control_objective'] > 0, row
assert 'optimal_value' not in s
" && grep -q "no known optimal control" soc_md/summary.md; then
  pass "soc: molecular dynamics (stopping time) reports the control objective"
else
  fail "soc molecular dynamics: $(cat soc_md.log soc_md.json)"
fi
expect_error "soc: unknown loss lists the valid ones" "unknown SOC loss 'adjoint' (valid: adjoint_matching," \
  "$tilt" soc -l adjoint -o soc2
expect_error "soc: unknown problem lists the valid ones" "unknown SOC problem 'triple_well' (valid:" \
  "$tilt" soc -p triple_well -l moment -o soc2
expect_error "soc: an empty --hidden width is an error, not dropped" "--hidden must be comma-separated layer widths" \
  "$tilt" soc -q -l moment --iterations 1 --hidden 64,,64 -o soc2
expect_error "soc: an unknown problem is named before a missing --loss" "unknown SOC problem 'triple_well' (valid:" \
  "$tilt" soc -p triple_well -o soc2
expect_error "soc: a loss that cannot handle the stopping time says so" "has a stopping time" \
  "$tilt" soc -p molecular_dynamics -l adjoint_matching -o soc3
expect_error "soc: refuses to overwrite a run" "already holds an SOC run; use --resume" "$tilt" soc -q -l moment --iterations 1 -o soc
# --resume continues each loss from its checkpoint: 10 iterations, then --resume to 14, equals 14 straight.
soc_args=(soc -q --problem linear_ou -l adjoint_matching -l cross_entropy --eval-every 5 --eval-batch 64 --batch 32
          --hidden 16 --threads 2 --checkpoint-every 5)
if "$tilt" "${soc_args[@]}" --iterations 14 -o soc_more > /dev/null 2> soc_more.log &&
   "$tilt" "${soc_args[@]}" --iterations 14 -o soc --resume > /dev/null 2> soc_resume.log &&
   grep -q "resuming with changed settings: iterations 10 -> 14" soc_resume.log &&
   grep -q "resumed cross_entropy at iteration 10" soc_resume.log &&
   cmp -s soc/adjoint_matching.eval.jsonl soc_more/adjoint_matching.eval.jsonl &&
   cmp -s soc/cross_entropy.eval.jsonl soc_more/cross_entropy.eval.jsonl &&
   [ "$(wc -l < soc/cross_entropy.jsonl)" -eq 14 ]; then
  pass "soc --resume continues to more iterations, as a straight run of them"
else
  fail "soc --resume: $(cat soc_more.log soc_resume.log)"
fi
expect_error "soc --resume: another setting is refused, naming it" "the settings differ from those 'soc/soc.resolved.json' was started with (in: 'steps')" \
  "$tilt" "${soc_args[@]}" --iterations 14 --steps 7 -o soc --resume
expect_error "soc --resume: fewer iterations than a checkpoint's" "adjoint_matching's checkpoint is at iteration 14, past --iterations 12" \
  "$tilt" "${soc_args[@]}" --iterations 12 -o soc --resume
expect_error "soc --resume: a directory without a run" "holds no SOC run to resume (no soc.resolved.json)" \
  "$tilt" "${soc_args[@]}" -o soc_none --resume
cp -r soc soc_damaged && echo "not json" >> soc_damaged/cross_entropy.eval.jsonl
before=$(md5sum < soc_damaged/soc.resolved.json)
expect_error "soc --resume: a damaged evaluations file is named" "'soc_damaged/cross_entropy.eval.jsonl' line 5 is not an evaluation" \
  "$tilt" "${soc_args[@]}" --iterations 20 -o soc_damaged --resume
[ "$before" = "$(md5sum < soc_damaged/soc.resolved.json)" ] && [ "$(wc -l < soc_damaged/adjoint_matching.jsonl)" -eq 14 ] &&
  pass "soc: the refused resume changed nothing" || fail "soc: the refused resume changed soc.resolved.json or trained"

# Images: the digits pipeline in miniature (pretrain, classifier, every fine-tuning method,
# eval-images, image grids) and its errors.
digits_data="$(dirname "$configs")/data/digits/digits.csv.gz"
cat > digits.toml <<TOML
seed = 2
threads = 2
[data]
type = "digits"
path = "$digits_data"
[pretrain]
hidden = [32]
iterations = 20
[classifier]
hidden = [32, 16]
iterations = 30
[base]
type = "model"
path = "dbase/model.pt"
[reward]
type = "classifier"
path = "dcls/classifier.pt"
class = 3
[finetune]
hidden = [16]
num_steps = 8
batch_size = 8
iterations = 3
loss_early_steps = 2
loss_late_steps = 2
clip_factor = 0.0
lr = 1e-3
TOML
if "$tilt" pretrain -q -c digits.toml -o dbase > dlog.txt 2>&1 && "$tilt" classifier -q -c digits.toml -o dcls >> dlog.txt 2>&1 &&
   grep -q "held-out images" dlog.txt && [ -f dcls/classifier.pt ]; then
  pass "digits: pretrain and classifier"
else
  fail "digits pretrain/classifier: $(cat dlog.txt)"
fi
ok=1
for m in adjoint_matching discrete_adjoint draft refl; do
  "$tilt" finetune -q -c digits.toml --set finetune.method=\"$m\" -o "d_$m" > dlog.txt 2>&1 && [ -f "d_$m/model.pt" ] &&
    [ "$(wc -l < "d_$m/metrics.jsonl")" -eq 3 ] || { ok=0; fail "digits finetune method=$m: $(cat dlog.txt)"; }
done
[ $ok = 1 ] && pass "digits: finetune with each method"
if grep -q "is ignored by method = \"draft\"" <("$tilt" finetune -q -c digits.toml --set finetune.method=\"draft\" -o d_draft2 2>&1); then
  pass "digits: Adjoint Matching keys a baseline ignores are named"
else
  fail "digits: no warning for keys draft ignores"
fi
if "$tilt" sample -m d_refl/model.pt -n 40 --steps 8 -o d.csv > dlog.txt 2>&1 && grep -q "zero (ODE)" dlog.txt &&
   "$tilt" eval-images -c digits.toml -s d.csv --json > d.json 2>> dlog.txt && python3 -c "
import json
r = json.load(open('d.json'))
s = r['samples']['d.csv']
assert s['n'] == 40 and 0 <= s['class_share'] <= 1 and s['frechet'] >= 0 and s['diversity'] >= 0, s
f = r['floor']  # 40 real images of the class, scored as samples: above the whole class's own 0
assert f['n'] == 40 and f['counts_of'] == 'd.csv' and f['frechet'] > r['real']['frechet'] + 1e-6, (f, r['real'])
" && "$tilt" plot --images 8x8 d.csv:refl -o d.png >> dlog.txt 2>&1 && [ -s d.png ]; then
  pass "digits: baselines sample with the ODE; eval-images --json; plot --images"
else
  fail "digits sample/eval/plot: $(cat dlog.txt d.json)"
fi
expect_error "plot: --images must match the dimension" "not 4x4 = 16 pixels" "$tilt" plot --images 4x4 d.csv -o e.png
expect_error "eval-images needs a classifier reward" "needs 'reward.type' = \"classifier\"" \
  "$tilt" eval-images -c digits.toml --set reward.type=\"ink\" -s d.csv
expect_error "classifier refuses WORLD_SIZE > 1 (it is not data-parallel)" "tilt classifier trains in one process" \
  env WORLD_SIZE=2 RANK=0 "$tilt" classifier -q -c digits.toml -o dcls_world
expect_absent "nor writes a run" dcls_world
# --json-file never replaces what the evaluation reads: the samples, the config, the reward's classifier.
before=$(md5sum d.csv digits.toml dcls/classifier.pt)
expect_error "eval-images --json-file over its samples" "--json-file 'd.csv' is also --samples 'd.csv'" \
  "$tilt" eval-images -c digits.toml -s d.csv --json-file d.csv
expect_error "eval-images --json-file over the config" "is also --config" \
  "$tilt" eval-images -c digits.toml -s d.csv --json-file digits.toml
expect_error "eval-images --json-file over the reward's classifier" "is also 'reward.path'" \
  "$tilt" eval-images -c digits.toml -s d.csv --json-file dcls/classifier.pt
[ "$before" = "$(md5sum d.csv digits.toml dcls/classifier.pt)" ] && pass "eval-images: its inputs are intact" ||
  fail "eval-images --json-file replaced an input"
expect_error "a missing classifier file is named" "cannot read classifier file 'nope.pt'" \
  "$tilt" finetune -c digits.toml --set reward.path=\"nope.pt\" -o d_x
expect_error "a class the classifier lacks" "reward.class" "$tilt" finetune -c digits.toml --set reward.class=10 -o d_y
expect_error "draft_k beyond the steps" "finetune.draft_k" \
  "$tilt" finetune -c digits.toml --set finetune.method=\"draft\" --set finetune.draft_k=9 -o d_z
# Policy-gradient baselines (docs/policy_gradient.md): DDPO with inner epochs, GRPO with a MixGRPO window.
ok=1
for spec in "ddpo|finetune.inner_epochs=2" "grpo|finetune.window=3 finetune.group_size=4"; do
  m=${spec%%|*}
  sets=()
  for s in ${spec#*|}; do sets+=(--set "$s"); done
  "$tilt" finetune -q -c digits.toml --set finetune.method=\"$m\" "${sets[@]}" -o "d_$m" > dlog.txt 2>&1 && [ -f "d_$m/model.pt" ] && [ "$(wc -l < "d_$m/metrics.jsonl")" -eq 3 ] &&
    grep -q ratio_clipped_fraction "d_$m/metrics.jsonl" || { ok=0; fail "digits finetune method=$m: $(cat dlog.txt)"; }
done
[ $ok = 1 ] && pass "digits: finetune with ddpo and grpo"
expect_error "grpo: groups must divide the batch" "finetune.group_size" \
  "$tilt" finetune -c digits.toml --set finetune.method=\"grpo\" --set finetune.group_size=3 -o d_g
expect_error "ddpo: the ODE is no policy" "gamma > 0" \
  "$tilt" finetune -c digits.toml --set finetune.method=\"ddpo\" --set finetune.noise=\"zero\" -o d_h
# 6. Sampling with tunable stochasticity (exact gDDIM step) and log Z (issue 6).
"$tilt" sample -m run/model.pt -n 200 --noise scaled_memoryless:2 --integrator exact --steps 20 -o g2.csv > /dev/null 2>&1 &&
  [ "$(wc -l < g2.csv)" -ge 200 ] && pass "sample --integrator exact at gamma = 2" || fail "sample --integrator exact"
expect_error "sample: the exact step refuses a schedule outside sigma = gamma sqrt(2 eta)" "sigma = gamma sqrt(2 eta)" \
  "$tilt" sample -m run/model.pt -n 10 --noise constant:0.5 --integrator exact -o x.csv
expect_error "sample --exact refuses a sampler's options instead of ignoring them" "--batch applies to a model's samples" \
  "$tilt" sample --exact target -c tiny.toml -n 10 --batch 5 -o x.csv
if "$tilt" logz -c tiny.toml --control optimal --method noising -n 2000 --steps 30 --json -q > logz.json 2> logz.log &&
   python3 - logz.json <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["n"] == 2000 and 0 < r["ess_fraction"] <= 1, r
assert abs(r["log_z"] - r["exact_log_z"]) < 4 * r["log_z_standard_error"], r
PY
then pass "logz --json: noising weights of the optimal control hit the exact log Z"; else fail "logz: $(cat logz.log logz.json)"; fi
"$tilt" logz -c tiny.toml -m run/model.pt -n 300 --steps 20 --batch 100 > logz.txt 2> logz.err &&
  grep -q "ESS" logz.txt && grep -q "logz" logz.err && pass "logz of a model file, with progress on stderr" ||
  fail "logz -m: $(cat logz.txt logz.err)"
expect_error "logz: the ODE has no path density" "no path density" \
  "$tilt" logz -c tiny.toml --noise ode -n 10 --steps 5
expect_error "logz: unknown method" "--method must be girsanov, noising or jarzynski" \
  "$tilt" logz -c tiny.toml --method ais -n 10

# 7. Adjoint Sampling of unnormalised densities and MCMC references (issue 6; docs/adjoint_sampling.md).
as_small=(--set threads=1 --set adjoint_sampling.iterations=40 --set adjoint_sampling.batch_size=64
          --set adjoint_sampling.steps=10 --set adjoint_sampling.initial_samples=64 --set adjoint_sampling.samples_per_refresh=32
          --set adjoint_sampling.refresh_every=10 --set adjoint_sampling.hidden=[16] --set evaluation.samples=200)
"$tilt" mcmc -c "$configs/as_dw4.toml" --set mcmc.steps=200 --set mcmc.burn_in=50 --set mcmc.chains=8 --set mcmc.thin=10 \
  -o dw4_ref.csv -q > /dev/null 2>&1 && [ -f dw4_ref.csv.json ] && pass "mcmc: a DW-4 reference with diagnostics" ||
  fail "mcmc"
if "$tilt" adjoint-sampling -c "$configs/as_dw4.toml" "${as_small[@]}" --reference dw4_ref.csv -o as_run -q --json > as.json 2> as.log &&
   python3 - as.json <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["gradient_steps"] == 40 and r["energy_evaluations"] == 64 + 3 * 32, r
assert r["vs_reference"]["distance_w2"] >= 0 and 0 < r["ess_fraction"] <= 1, r
PY
then pass "adjoint-sampling --json: DW-4 trained and evaluated against the MCMC reference"; else fail "adjoint-sampling: $(cat as.log as.json)"; fi
expect_error "adjoint-sampling refuses to overwrite a run" "already" \
  "$tilt" adjoint-sampling -c "$configs/as_dw4.toml" "${as_small[@]}" -o as_run -q
# Its model.pt is a control u(x, t) of the Brownian base, not a velocity: sample draws from the controlled Brownian
# chain (the samples of the run's own evaluation have its energy's scale), export refuses it (issue 18).
if "$tilt" sample -m as_run/model.pt -n 300 --seed 3 -o as_control.csv > as_sample.log 2>&1 &&
   grep -q "Adjoint Sampling control of energy" as_sample.log && python3 - as_control.csv as_run/samples.csv <<'PY'
import csv, sys, statistics
def rows(path):
    with open(path) as f:
        r = csv.reader(f); next(r)
        return [[float(v) for v in row] for row in r]
a, b = rows(sys.argv[1]), rows(sys.argv[2])
assert len(a) == 300 and len(a[0]) == len(b[0]), (len(a), len(a[0]), len(b[0]))
# The same sampler as the run's evaluation: per coordinate, the spreads agree within sampling error.
for j in range(len(a[0])):
    sa, sb = statistics.pstdev(r[j] for r in a), statistics.pstdev(r[j] for r in b)
    assert 0.7 < sa / sb < 1.4, (j, sa, sb)
PY
then pass "sample draws from an Adjoint Sampling control"; else fail "sample of an Adjoint Sampling control: $(tail -3 as_sample.log)"; fi
expect_error "sample of an Adjoint Sampling control takes no --noise" "is sampled with the Brownian base it was trained with" \
  "$tilt" sample -m as_run/model.pt -n 10 --noise ode -o as_x.csv
expect_error "export refuses an Adjoint Sampling control" "model file 'as_run/model.pt': it is an Adjoint Sampling control" \
  "$tilt" export -m as_run/model.pt -o as_control.ts
expect_error "adjoint-sampling: an unknown [adjoint_sampling] key" "adjoint_sampling.buffer" \
  "$tilt" adjoint-sampling -c "$configs/as_gmm.toml" --set adjoint_sampling.buffer=5 -o as_bad -q
expect_error "adjoint-sampling: a missing reference file" "tilt mcmc" \
  "$tilt" adjoint-sampling -c "$configs/as_gmm.toml" --reference nowhere.csv -o as_bad2 -q

# 8. ODE Adjoint Matching (issue 6): a truncated run, its warning, model info, and its regulariser keys.
if "$tilt" finetune -q -c tiny.toml --set finetune.method=\"ode_adjoint_matching\" --set finetune.adjoint_steps=5 \
     --set finetune.regulariser=\"pnorm\" --set finetune.reg_power=1.5 --set finetune.iterations=5 -o ode_am > ode_am.log 2>&1 &&
   grep -q "is NOT p\*" ode_am.log && [ "$(wc -l < ode_am/metrics.jsonl)" -eq 5 ] && grep -q '"objective"' ode_am/metrics.jsonl &&
   "$tilt" sample -m ode_am/model.pt -n 50 -o ode_am.csv 2>&1 | grep -q "zero (ODE)"; then
  pass "finetune method = ode_adjoint_matching (truncated, p-norm), sampled with the ODE by default"
else
  fail "ode_adjoint_matching: $(cat ode_am.log)"
fi
expect_error "ode_adjoint_matching: clipped needs reg_clip" "finetune.reg_clip" \
  "$tilt" finetune -c tiny.toml --set finetune.method=\"ode_adjoint_matching\" --set finetune.regulariser=\"clipped\" -o ode_x
expect_error "ode_adjoint_matching: adjoint_steps beyond the steps" "must be in 0..num_steps = 20" \
  "$tilt" finetune -c tiny.toml --set finetune.method=\"ode_adjoint_matching\" --set finetune.adjoint_steps=21 -o ode_y

# 9. Method tables, and flags that mean the same in every command (issue 18).
{ tiny_config 1 2; cat <<'TOML'
[finetune]
method = "draft"
hidden = [8]
num_steps = 10
batch_size = 8
iterations = 2
[finetune.draft]
draft_k = 3
[finetune.adjoint_matching]
loss_late_steps = 5
TOML
} > tables.toml
if "$tilt" finetune -q -c tables.toml --json -o tab > tab.json 2> tab.log && [ "$(wc -l < tab.json)" -eq 1 ] &&
   python3 -c "import json; r = json.load(open('tab.json')); assert r['model'] == 'tab/model.pt' and r['iterations'] == 2, r" &&
   python3 -c "import json; r = json.load(open('tab/config.resolved.json')); assert r['finetune']['draft']['draft_k'] == 3, r" &&
   grep -q "\[finetune.adjoint_matching\] is ignored by method = \"draft\"" tab.log && ! grep -q "belongs in" tab.log; then
  pass "finetune: [finetune.draft] read, another method's table noted, --json one line"
else
  fail "method tables: $(cat tab.log tab.json)"
fi
expect_error "an unknown key in the method's table names key and table" "unknown key 'finetune.draft.draft_kk'" \
  "$tilt" finetune -q -c tables.toml --set finetune.draft.draft_kk=2 -o tab_x
expect_error "an unknown key in another method's table too" "'finetune.ddpo.epochs' in [finetune.ddpo]" \
  "$tilt" finetune -q -c tables.toml --set finetune.ddpo.epochs=2 -o tab_y
expect_error "a key in its table and flat at once" "are both given" \
  "$tilt" finetune -q -c tables.toml --set finetune.draft_k=2 -o tab_z
if "$tilt" finetune -q -c tables.toml --set finetune.method=\"adjoint_matching\" --set finetune.loss_early_steps=2 -o tab_old \
     > old.log 2>&1 && grep -q "'finetune.loss_early_steps' belongs in \[finetune.adjoint_matching\]" old.log; then
  pass "an old flat key still works, with a warning naming its table"
else
  fail "flat key: $(cat old.log)"
fi
expect_error "export --check-file (the new name of its --reference) is checked like it" "--check-file 'run/model.pt' is also --model" \
  "$tilt" export -m run/model.pt -o m.ts --check-file run/model.pt
expect_error "export: --check-file and its old spelling at once" "not both" \
  "$tilt" export -m run/model.pt -o m.ts --check-file a.pt --reference b.pt
expect_error "--device that is no device" "--device must be cpu, cuda or cuda:N, got 'gpu'" "$tilt" eval -c tiny.toml -s x.csv --device gpu
# On a machine without a GPU (CI), cuda is refused before anything runs; a config's device is named as its key.
if ! "$tilt" finetune -q -c tiny.toml --set finetune.iterations=1 -o dev_probe --device cuda > /dev/null 2>&1; then
  expect_error "--device cuda without a GPU" "--device = cuda: no CUDA device is available" \
    "$tilt" finetune -q -c tiny.toml -o dev_cuda --device cuda
  expect_error "device = \"cuda:3\" in a config without a GPU" "'device' = cuda:3: no CUDA device" \
    "$tilt" finetune -q -c tiny.toml --set 'device="cuda:3"' -o dev_cuda
  if [ -e dev_cuda ]; then fail "a refused device left a run directory"; else pass "a refused device writes nothing"; fi
fi
"$tilt" finetune -q -c tiny.toml --set finetune.iterations=2 --set 'device="cuda"' --device cpu -o dev_cpu > dev_cpu.log 2>&1 &&
  [ -f dev_cpu/model.pt ] && pass "--device cpu wins over a config's device" || fail "--device over the config: $(cat dev_cpu.log)"
cat > soc.toml <<'TOML'
seed = 2
[soc]
problem = "linear_ou"
losses = ["adjoint_matching"]
iterations = 4
batch = 8
eval_batch = 8
eval_every = 2
hidden = [4]
TOML
if "$tilt" soc -q -c soc.toml --iterations 2 --json -o soc_cfg > soc_cfg.json 2> soc_cfg.log && python3 -c "
import json
r = json.load(open('soc_cfg/soc.resolved.json'))
assert r['problem'] == 'linear_ou' and r['iterations'] == 2 and r['batch'] == 8 and r['seed'] == 2, r
assert json.load(open('soc_cfg.json'))['iterations'] == 2
"; then
  pass "soc reads [soc] and the top-level seed; a flag overrides the file"
else
  fail "soc -c: $(cat soc_cfg.log soc_cfg.json)"
fi
expect_error "soc: a bad value from the file names the key" "'soc.batch' must be in 1.." \
  "$tilt" soc -q -c soc.toml --set soc.batch=0 -o soc_cfg2
expect_error "soc: an unknown [soc] key" "unknown key 'soc.iteration'" "$tilt" soc -q -c soc.toml --set soc.iteration=3 -o soc_cfg3
# The SOC-matching paper's instance (its seed-0 x0: V(x0, 0) = 5.818) and its published L2 error; parameters by name.
if "$tilt" soc -q --json -p quadratic_ou_easy -l adjoint_matching --iterations 2 --batch 8 --hidden 4 --eval-batch 8 \
     --eval-every 2 --instance socm --l2-error socm -o soc_socm > soc_socm.json 2> soc_socm.log && python3 -c "
import json
s = json.load(open('soc_socm.json'))
assert abs(s['optimal_value'] - 5.8182248) < 1e-6 and s['l2_error'] == 'socm', s
assert abs(s['log_weight_normaliser'] + 5.82) < 0.1, s
r = json.load(open('soc_socm/soc.resolved.json'))
assert r['instance'] == 'socm' and r['l2_error'] == 'socm', r
"; then
  pass "soc --instance socm --l2-error socm: the paper's seed-0 instance and metric"
else
  fail "soc --instance socm: $(cat soc_socm.log soc_socm.json)"
fi
if "$tilt" soc -q --json -c soc.toml --set soc.linear_ou.dim=3 --set 'soc.linear_ou.x0=[1, 0, 0]' \
     --set soc.linear_ou.A=-1 --set soc.linear_ou.sigma=1 --set soc.linear_ou.T=2 -o soc_params > soc_params.json \
     2> soc_params.log && python3 -c "
import json, math
s = json.load(open('soc_params.json'))
# A = -I, sigma = I, omega = 1, T = 2: beta(s) = e^{-(T - s)} 1, V = beta(0) . x0 - (3/2) int_0^2 e^{-2(2 - s)} ds.
v = math.exp(-2) - 1.5 * (1 - math.exp(-4)) / 2
assert s['dim'] == 3 and abs(s['optimal_value'] - v) < 1e-8, (s, v)
"; then
  pass "soc: a problem's parameters from [soc.<problem>]"
else
  fail "soc [soc.linear_ou]: $(cat soc_params.log soc_params.json)"
fi
expect_error "soc: a parameter of the wrong size names the key" \
  "'soc.linear_ou': SOC problem 'linear_ou': 'x0' must be a number or a vector of 10 numbers" \
  "$tilt" soc -q -c soc.toml --set 'soc.linear_ou.x0=[1, 2]' -o soc_bad1
expect_error "soc: a parameter the problem does not take" "unknown key 'soc.linear_ou.P'" \
  "$tilt" soc -q -c soc.toml --set soc.linear_ou.P=1 -o soc_bad2
expect_error "soc: the parameters of another problem" "'soc.double_well' sets the parameters of double_well, but the problem is linear_ou" \
  "$tilt" soc -q -c soc.toml --set soc.double_well.dim=2 -o soc_bad3
expect_error "soc: a bad instance" "'soc.instance' is 'paper', which is not one of" "$tilt" soc -q -c soc.toml --set soc.instance=\"paper\" -o soc_bad4
expect_error "soc: a matrix of ragged rows" "'soc.linear_ou.A' must be a number, an array of numbers or an array of equally long rows" \
  "$tilt" soc -q -c soc.toml --set 'soc.linear_ou.A=[[1, 2], [3]]' -o soc_bad5

if [ $failures -ne 0 ]; then echo "$failures CLI test(s) failed"; exit 1; fi
echo "all CLI tests passed"
