#!/usr/bin/env bash
# TorchScript interop through the tilt command line, with Python's torch.jit on the other side:
# export a base and a reward from Python (examples/torchscript_export.py), fine-tune them with tilt
# (residual and copy mode), export the result, and check in Python that the exported module computes
# tilt's velocity and differs from the base; then epsilon and score models from Python against the
# exact mixture velocity; then conditional models: forward(x, t, c) and forward(x, c) from Python in
# tilt, and tilt's export of a conditional model in Python and back. Needs Debian's python3-torch for
# /usr/bin/python3; exits 77 (skipped) without it.
# Usage: torchscript_test.sh path/to/tilt path/to/source path/to/tilt_torchscript_conditions
set -uo pipefail
tilt=$(realpath "$1")
src=$(realpath "$2")
conditions=$(realpath "$3")  # tests/cli/torchscript_conditions.cpp
py=${TILT_PYTHON:-/usr/bin/python3}  # Debian's python3-torch; the pyenv python3 on PATH does not see it
if ! "$py" -c "import torch" > /dev/null 2>&1; then
  echo "SKIP: Debian's python3-torch is not installed for $py (scripts/setup.sh installs it)"
  exit 77
fi
export OMP_NUM_THREADS=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
failures=0
pass() { echo "ok   $1"; }
fail() { echo "FAIL $1"; failures=$((failures + 1)); }

# 1. Base velocity network (briefly trained) and reward from Python.
if "$py" "$src/examples/torchscript_export.py" --out-dir ts --steps 100 > log.txt 2>&1 &&
   [ -s ts/base_velocity.ts ] && [ -s ts/reward.ts ]; then
  pass "examples/torchscript_export.py writes the base and the reward"
else
  fail "export from Python: $(cat log.txt)"
fi

cat > ts.toml <<'TOML'
seed = 2
threads = 1
[schedule]
type = "linear"
[base]
type = "torchscript"
path = "ts/base_velocity.ts"
[reward]
type = "torchscript"
path = "ts/reward.ts"
[finetune]
hidden = [32, 32]
num_steps = 20
batch_size = 32
iterations = 15
loss_early_steps = 5
loss_late_steps = 5
loss_weighting = "velocity"
clip_factor = 0.0
grad_clip = 0.0
lr = 2e-3
weight_decay = 0.0
TOML

# log Z of a TorchScript base and reward: the config needs no [data]; girsanov and jarzynski agree (4 standard errors).
if "$tilt" logz -c ts.toml -n 2000 --steps 50 --threads 1 -q --json > lz_g.json 2> log.txt &&
   "$tilt" logz -c ts.toml --method jarzynski -n 2000 --steps 50 --threads 1 -q --json > lz_j.json 2>> log.txt &&
   python3 - lz_g.json lz_j.json <<'PY'
import json, sys
g, j = (json.load(open(f)) for f in sys.argv[1:])
se = (g["log_z_standard_error"] ** 2 + j["log_z_standard_error"] ** 2) ** 0.5
assert abs(g["log_z"] - j["log_z"]) < 4 * se + 0.02, (g, j)  # + girsanov's O(1/steps) bias
PY
then
  pass "logz of a TorchScript base and reward without [data]"
else
  fail "logz without [data]: $(cat log.txt lz_g.json lz_j.json)"
fi

# 2. Fine-tune (residual and copy), export, compare in Python; the model file loads back in tilt sample.
ok=1
for mode in residual copy; do
  "$tilt" finetune -q -c ts.toml --set finetune.model=$mode -o $mode > log.txt 2>&1 &&
    "$tilt" export -m $mode/model.pt -o $mode.ts --reference $mode.ref.pt >> log.txt 2>&1 ||
    { fail "$mode: $(cat log.txt)"; ok=0; }
done
if [ $ok = 1 ]; then
  if "$py" "$src/tests/cli/torchscript_check.py" compare ts/base_velocity.ts residual.ts:residual.ref.pt \
       copy.ts:copy.ref.pt > log.txt 2>&1; then
    pass "residual and copy: fine-tuned in tilt, exported; Python's output equals tilt's velocity, differs from the base"
  else
    fail "compare in Python: $(cat log.txt)"
  fi
fi
rm ts/base_velocity.ts  # the model file embeds the base: it must not need the original any more
if "$tilt" sample -m residual/model.pt -n 100 --steps 10 --threads 1 -o s.csv > log.txt 2>&1 &&
   [ "$(wc -l < s.csv)" -ge 100 ]; then
  pass "tilt sample loads a fine-tuned model whose base is TorchScript, without the .ts file"
else
  fail "sample: $(cat log.txt)"
fi

# 3. Epsilon and score models from Python, converted by tilt, against the exact mixture velocity
#    (0 iterations: the fine-tuned model is the converted base).
refs=()
if "$py" "$src/tests/cli/torchscript_check.py" mixture . > log.txt 2>&1; then
  # Two of the four pairs (the unit tests convert every prediction with every schedule).
  for case in epsilon:linear score:cosine; do
    pred=${case%%:*} sched=${case##*:}
    "$tilt" finetune -q -c ts.toml --set schedule.type=$sched --set base.path=${pred}_$sched.ts \
      --set base.prediction=$pred --set finetune.iterations=0 -o conv_${pred}_$sched >> log.txt 2>&1 &&
      "$tilt" export -m conv_${pred}_$sched/model.pt -o conv.ts --reference ${pred}_$sched.ref.pt >> log.txt 2>&1 &&
      refs+=("${pred}_$sched.ref.pt:$pred:$sched")
  done
fi
if [ ${#refs[@]} -eq 2 ] && "$py" "$src/tests/cli/torchscript_check.py" exact "${refs[@]}" >> log.txt 2>&1; then
  pass "epsilon (linear) and score (cosine) models from Python give the exact mixture velocity in tilt"
else
  fail "epsilon / score conversion: $(cat log.txt)"
fi

# 4. Conditional models. Python writes a base forward(x, t, c: Optional[Tensor]) and a reward
#    forward(x, c) with its own values (autograd for the VJP and the gradient); tilt loads them and
#    compares. Then tilt exports conditional model files (an MLP, a residual fine-tune of it), Python
#    checks them against tilt's values and scripts them into modules of its own, and tilt loads those
#    back as TorchScript bases.
if "$py" "$src/tests/cli/torchscript_check.py" conditional . > log.txt 2>&1 &&
   "$conditions" base cond_base.ts cond_ref.pt >> log.txt 2>&1 &&
   "$conditions" reward cond_reward.ts cond_ref.pt >> log.txt 2>&1; then
  pass "conditional base forward(x, t, c) and reward forward(x, c) from Python: tilt's v, null v, VJP, r and grad r equal Python's"
else
  fail "conditional modules from Python: $(cat log.txt)"
fi
ok=1
"$conditions" models . > log.txt 2>&1 || ok=0
for m in cond_mlp cond_ft; do
  [ $ok = 1 ] || break
  "$tilt" export -m $m.pt -o $m.ts --check-file $m.check.pt >> log.txt 2>&1 &&
    "$py" "$src/tests/cli/torchscript_check.py" roundtrip $m.ts $m.check.pt $m.py.ts >> log.txt 2>&1 &&
    "$conditions" back $m.pt $m.py.ts >> log.txt 2>&1 || ok=0
done
if [ $ok = 1 ] && grep -q "c \[B, 3\] or None" log.txt; then
  pass "conditional MLP and fine-tuned model: tilt export -> Python (c, one c, None) -> re-scripted -> back in tilt"
else
  fail "conditional export round trip: $(cat log.txt)"
fi

# 5. Errors that name the file and the problem.
expect_error() {
  local name=$1 text=$2; shift 2
  local out
  out=$("$@" 2>&1); local rc=$?
  if [ $rc -ne 0 ] && grep -qF -- "$text" <<<"$out"; then pass "$name"; else fail "$name (rc=$rc): $out"; fi
}
expect_error "missing TorchScript base" "cannot read TorchScript model 'absent.ts': no such file" \
  "$tilt" finetune -c ts.toml --set base.path=absent.ts -o e1
echo "garbage" > junk.ts
expect_error "corrupt TorchScript base" "cannot read TorchScript model 'junk.ts': not a TorchScript archive" \
  "$tilt" finetune -c ts.toml --set base.path=junk.ts -o e2
expect_error "a reward module given as the base" "must have forward(x, t) taking tensors" \
  "$tilt" finetune -c ts.toml --set base.path=ts/reward.ts -o e3
expect_error "wrong dimension" "has dim = 2 but dimension 3 was given" \
  "$tilt" finetune -c ts.toml --set base.path=epsilon_linear.ts --set base.dim=3 -o e4
expect_error "a base module given as the reward" "must have forward(x) taking tensors" \
  "$tilt" finetune -c ts.toml --set base.path=epsilon_linear.ts --set reward.path=epsilon_linear.ts -o e5
expect_error "unknown prediction" "'base.prediction' is 'noise', which is not one of: velocity, epsilon, score" \
  "$tilt" finetune -c ts.toml --set base.prediction=noise -o e6
# A base mixing the rows of its batch, and a conditional reward whose forward takes another condition size
# than its condition_dim says: refused on load, each with the reason.
cat > faulty.py <<'PY'
import torch
class BatchMean(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.dim = 2
    def forward(self, x, t):
        return x - x.mean(0, keepdim=True)
class WrongCondition(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.condition_dim = 1
        self.w = torch.nn.Parameter(torch.ones(3, 2))
    def forward(self, x, c):
        return (x * (c @ self.w)).sum(1)
torch.jit.save(torch.jit.script(BatchMean()), "batch_mean.ts")
torch.jit.save(torch.jit.script(WrongCondition()), "wrong_condition.ts")
PY
"$py" faulty.py > log.txt 2>&1 || fail "making the faulty modules: $(cat log.txt)"  # scripting reads the source file
expect_error "a base whose rows depend on each other" "differs from the same call on row 0 alone" \
  "$tilt" finetune -c ts.toml --set base.path=batch_mean.ts -o e7
expect_error "a conditional reward of another condition size" "(called with c of 1 numbers a row: is condition_dim = 1 right?)" \
  "$tilt" finetune -c ts.toml --set base.path=epsilon_linear.ts --set reward.path=wrong_condition.ts -o e8
if [ "$(compgen -G 'e[0-9]')" = "" ]; then pass "failed configs create no run directory"; else fail "stray run directory"; fi

if [ $failures -ne 0 ]; then echo "$failures TorchScript test(s) failed"; exit 1; fi
echo "all TorchScript tests passed"
