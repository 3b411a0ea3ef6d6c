#!/usr/bin/env bash
# Configuration values and flags that are nonsense (too deep, duplicated, non-finite, out of range,
# absurdly large): each must stop the command at once with "tilt: error:", exit status 1, a message
# naming the key or flag (docs/config.md, "Limits"), and nothing written.
# Usage: config_errors_test.sh path/to/tilt configs/
set -uo pipefail
source "$(dirname "$(realpath "$0")")/lib.sh"
tilt=$(realpath "$1")
configs=$(realpath "$2")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

# expect_nothing_written NAME PATH: the refused command left no run behind.
expect_nothing_written() {
  if [ ! -e "$2" ]; then pass "$1 writes nothing"; else fail "$1 left $2 behind"; fi
}

{ tiny_config 1 1; cat <<'TOML'
[finetune]
hidden = [16]
num_steps = 10
batch_size = 16
iterations = 2
loss_early_steps = 3
loss_late_steps = 3
clip_factor = 0.0
lr = 1e-3
checkpoint_every = 2
TOML
} > tiny.toml

# Nesting: 100,000 arrays deep crashed nlohmann's recursive parser and destructor.
python3 -c "print('{\n\"seed\": 1,\n\"x\": ' + '[' * 100000 + ']' * 100000 + '\n}')" > deep.json
expect_error "a JSON file nested 100,000 deep names the file and line" "'deep.json' (line 3): values are nested deeper than 256" \
  "$tilt" finetune -c deep.json -o run_deep
expect_nothing_written "deep JSON" run_deep
python3 -c "print('seed = 1\nx = ' + '[' * 100000 + ']' * 100000)" > deep.toml
expect_error "a TOML file nested 100,000 deep names the file and line" "'deep.toml' (line 2): values are nested deeper than 256" \
  "$tilt" finetune -c deep.toml -o run_deep
expect_error "a --set value nested 60,000 deep" "values are nested deeper than 256" \
  "$tilt" finetune -c tiny.toml --set "finetune.x=$(python3 -c "print('[' * 60000 + ']' * 60000)")" -o run_deep

# A JSON key given twice (TOML refuses it; JSON kept the last value).
cat > dup.json <<'JSON'
{"seed": 1, "threads": 1, "seed": 2}
JSON
expect_error "a JSON key given twice is named" "'dup.json': the key 'seed' is given more than once" \
  "$tilt" sample --exact base -c dup.json -n 10 -o dup.csv

# Non-finite numbers: eps = inf trained nothing and exited 0; nan was written as null.
cp tiny.toml inf.toml && sed -i 's/^lr = 1e-3/lr = 1e-3\neps = inf/' inf.toml
expect_error "eps = inf is refused" "'finetune.eps' must be a finite number, got inf" "$tilt" finetune -q -c inf.toml -o run_inf
expect_nothing_written "eps = inf" run_inf
cp tiny.toml nan.toml && sed -i 's/^center = .*/center = [nan, 0.0]/' nan.toml
expect_error "nan in reward.center is refused" "'reward.center' must hold finite numbers, got nan" \
  "$tilt" finetune -q -c nan.toml -o run_nan
printf '{"seed": 1, "reward": {"lambda": 1e999}}\n' > overflow.json
expect_error "JSON 1e999 names the file" "'overflow.json' is not valid JSON" "$tilt" eval -c overflow.json -s x.csv

# Out-of-range values, refused before anything is written.
expect_error "lr = 1e300 names the key and the range" "'finetune.lr' must be in [1e-12, 1], got 1e+300" \
  "$tilt" finetune -q -c tiny.toml --set finetune.lr=1e300 -o run_lr
expect_nothing_written "lr = 1e300" run_lr
expect_error "lambda = 1e300" "'reward.lambda' must be in [-10000, 10000]" \
  "$tilt" finetune -q -c tiny.toml --set reward.lambda=1e300 -o run_lambda
expect_error "a negative std" "'data.std'" "$tilt" finetune -q -c tiny.toml --set data.std=-1 -o run_std
expect_error "a negative grad_clip" "'finetune.grad_clip' must be >= 0" \
  "$tilt" finetune -q -c tiny.toml --set finetune.grad_clip=-1 -o run_gc
expect_error "num_steps = 10^12 says the limit" "'finetune.num_steps' must be in 2..100000" \
  "$tilt" finetune -q -c tiny.toml --set finetune.num_steps=1000000000000 -o run_steps
expect_error "batch_size = 10^12 says the limit" "'finetune.batch_size' must be in 1..1000000" \
  "$tilt" finetune -q -c tiny.toml --set finetune.batch_size=1000000000000 -o run_batch
expect_error "pretrain batch_size = 10^12" "'pretrain.batch_size' must be in 1..1000000" \
  "$tilt" pretrain -q -c tiny.toml --set pretrain.batch_size=1000000000000 -o run_pb
expect_error "a hidden width of 10^9" "'finetune.hidden' widths must be in 1..16384" \
  "$tilt" finetune -q -c tiny.toml --set 'finetune.hidden=[1000000000]' -o run_hidden

expect_error "ddpo inner_epochs = 10^12" "'finetune.inner_epochs' must be in 1..1000" \
  "$tilt" finetune -q -c tiny.toml --set finetune.method=\"ddpo\" --set finetune.inner_epochs=1000000000000 -o run_ie

# Threads: 100000 blocked in futex_wait with no output.
expect_error "threads = 100000 names the key and the limit" "'threads' must be in 0..1024" \
  "$tilt" finetune -q -c tiny.toml --set threads=100000 -o run_threads
expect_error "threads = 2^32 + 1 is not read as 1" "'threads' must be in 0..1024" \
  "$tilt" finetune -q -c tiny.toml --set threads=4294967297 -o run_threads
expect_nothing_written "threads = 100000" run_threads
expect_error "sample --threads 100000" "--threads must be in 0..1024" \
  "$tilt" sample --exact base -c tiny.toml -n 10 --threads 100000 -o t.csv
expect_error "logz --threads 100000" "--threads must be in 0..1024" \
  "$tilt" logz -c tiny.toml --threads 100000 -n 10 -q
expect_error "logz --threads -3" "--threads must be in 0..1024" "$tilt" logz -c tiny.toml --threads -3 -n 10 -q
expect_error "soc --threads 100000" "--threads must be in 0..1024" \
  "$tilt" soc -q -l adjoint_matching --threads 100000 --iterations 1 -o soc_threads
expect_nothing_written "soc --threads 100000" soc_threads

# The memoryless schedule's offset h: memoryless:5 landed 115x the noise floor from p*.
expect_error "finetune.noise = memoryless:5 names the key" "'finetune.noise'" \
  "$tilt" finetune -q -c tiny.toml --set finetune.noise=memoryless:5 -o run_noise
expect_error "finetune.noise = memoryless:5 says the range" "offset h must be in (0, 1)" \
  "$tilt" finetune -q -c tiny.toml --set finetune.noise=memoryless:5 -o run_noise
expect_nothing_written "finetune.noise = memoryless:5" run_noise
expect_error "finetune.noise = constant:inf" "'finetune.noise'" \
  "$tilt" finetune -q -c tiny.toml --set finetune.noise=constant:inf -o run_noise

# Flags of the commands that take a model: a two-iteration model to sample from.
if "$tilt" finetune -q -c tiny.toml -o run > log.txt 2>&1 && [ -f run/model.pt ]; then
  pass "a tiny model to sample from"
else
  fail "tiny finetune: $(cat log.txt)"
fi
expect_error "sample --noise memoryless:5 names the flag" "--noise" \
  "$tilt" sample -m run/model.pt --noise memoryless:5 -n 10 -o s.csv
expect_error "sample --noise memoryless:5 says the range" "offset h must be in (0, 1)" \
  "$tilt" sample -m run/model.pt --noise memoryless:5 -n 10 -o s.csv
expect_error "sample --steps -7 (was 100)" "--steps must be in 1..100000" \
  "$tilt" sample -m run/model.pt --steps -7 -n 10 -o s.csv
expect_error "sample --steps 0" "--steps must be in 1..100000" "$tilt" sample -m run/model.pt --steps 0 -n 10 -o s.csv
expect_error "sample -n -5" "--n must be in 1..10000000" "$tilt" sample -m run/model.pt -n -5 -o s.csv
expect_error "sample -n 10^12" "--n must be in 1..10000000" "$tilt" sample -m run/model.pt -n 1000000000000 -o s.csv
expect_nothing_written "sample with nonsense flags" s.csv
expect_error "export --points -1" "--points must be in 1..1000000" \
  "$tilt" export -m run/model.pt -o m.ts --reference r.pt --points -1
expect_error "eval --replicates 10^9" "--replicates must be in 1..1000" \
  "$tilt" eval -c tiny.toml -s x.csv --replicates 1000000000
expect_error "logz --batch 0" "--batch must be in 1..1000000" "$tilt" logz -c tiny.toml --batch 0 -n 10 -q
expect_error "logz --steps -1" "--steps must be in 1..100000" "$tilt" logz -c tiny.toml --steps -1 -n 10 -q
expect_error "logz --noise memoryless:5 names the flag" "--noise" "$tilt" logz -c tiny.toml --noise memoryless:5 -n 10 -q
expect_error "soc --batch 10^12" "--batch must be in 1..1000000" \
  "$tilt" soc -q -l adjoint_matching --batch 1000000000000 --iterations 1 -o soc_bad
expect_error "soc --steps -3 (was the default)" "--steps must be in 0..100000" \
  "$tilt" soc -q -l adjoint_matching --steps -3 --iterations 1 -o soc_bad
expect_error "soc --lr 1e300" "--lr must be in [1e-12, 1]" "$tilt" soc -q -l adjoint_matching --lr 1e300 --iterations 1 -o soc_bad
expect_error "soc --hidden 0" "--hidden" "$tilt" soc -q -l adjoint_matching --hidden 0 --iterations 1 -o soc_bad
expect_nothing_written "soc with nonsense flags" soc_bad
expect_error "adjoint-sampling: evaluation.samples = 10^12" "'evaluation.samples' must be in 2..10000000" \
  "$tilt" adjoint-sampling -c "$configs/as_gmm.toml" --set evaluation.samples=1000000000000 -o as_bad -q
expect_nothing_written "adjoint-sampling with nonsense" as_bad

# Integer flags: decimal digits that fit 64 bits (CLI11 clamped 2^64 to 2^63 - 1, and read 010 as octal 8).
expect_error "--seed 2^64 is out of range, not the largest seed" "--seed: '18446744073709551616' is out of range" \
  "$tilt" sample --exact base -c tiny.toml -n 10 -o s.csv --seed 18446744073709551616
expect_error "--seed in hexadecimal" "must be a whole number in decimal digits, got '0x10'" \
  "$tilt" sample --exact base -c tiny.toml -n 10 -o s.csv --seed 0x10
"$tilt" sample --exact base -c tiny.toml -n 10 -o s8.csv --seed 8 -q 2>/dev/null && "$tilt" sample --exact base -c tiny.toml -n 10 \
  -o s010.csv --seed 010 -q 2>/dev/null && "$tilt" sample --exact base -c tiny.toml -n 10 -o s10.csv --seed 10 -q 2>/dev/null
if cmp -s s010.csv s10.csv && ! cmp -s s010.csv s8.csv; then pass "--seed 010 is ten"; else fail "--seed 010 is not ten"; fi
expect_error "a config integer past 64 bits says so" "must be an integer of at most 64 bits" \
  "$tilt" sample --exact base -c tiny.toml -n 10 -o s.csv --set seed=18446744073709551615
expect_error "--guidance nan names the flag and the value" "--guidance must be a finite number, got nan" \
  "$tilt" sample -m run/model.pt -n 10 -o s.csv --guidance nan
expect_error "--device given empty is not the CPU by default" "--device must be cpu, cuda or cuda:N, got ''" \
  "$tilt" sample --exact base -c tiny.toml -n 10 -o s.csv --device ''
expect_error "--condition given empty is not every training condition" "--condition is empty" \
  "$tilt" sample -m run/model.pt -n 10 -o s.csv --condition ''
expect_error "sample --steps 1 with the memoryless default says why" "--steps 1: the memoryless schedule's offset" \
  "$tilt" sample -m run/model.pt -n 10 -o s.csv --steps 1
expect_error "logz --steps 1 with the memoryless default says why" "--steps 1: the memoryless schedule's offset" \
  "$tilt" logz -c tiny.toml -n 10 -q --steps 1
expect_error "logz of a conditional reward without a condition" "[reward] takes a condition of 1 numbers" \
  "$tilt" logz -c tiny.toml -n 10 -q --set reward.center_shift=[[1.0],[0.0]]

# tilt soc makes every loss and its trainer before it writes: a batch too small for a variance, more shards than
# samples, a loss named twice are refused with nothing written.
expect_error "soc: log_variance on a batch of 1" "batch_size must be >= 2" \
  "$tilt" soc -q -l adjoint_matching -l log_variance --batch 1 --iterations 1 -o soc_bad
expect_error "soc: more shards than samples" "100 shards of a batch of 16" \
  "$tilt" soc -q -l adjoint_matching --batch 16 --shards 100 --iterations 1 -o soc_bad
expect_error "soc: a loss named twice" "--loss names adjoint_matching twice" \
  "$tilt" soc -q -l adjoint_matching -l adjoint_matching --iterations 1 -o soc_bad
expect_nothing_written "soc refused before training" soc_bad

# Targets: an improper one is refused before training, naming [reward] and lambda; a strong tilt whose other
# components' weights underflow keeps the one that holds the mass.
expect_error "a quadratic reward whose negative lambda makes p* improper" "[reward] (quadratic, lambda = -2)" \
  "$tilt" finetune -c tiny.toml --set reward.lambda=-2 --set reward.precision=8 -o run_improper
expect_nothing_written "the improper target" run_improper
cat > strong.toml <<'TOML'
[data]
type = "gmm"
means = [[0.0, 0.0], [3.0, 0.0]]
std = [0.5, 2.0]
[reward]
type = "linear"
a = [1.0, 0.0]
lambda = 20.0
TOML
if "$tilt" sample --exact target -c strong.toml -n 4000 -o strong.csv -q 2>/dev/null && python3 - strong.csv <<'PY'
import sys
rows = [list(map(float, l.split(","))) for l in open(sys.argv[1]).read().split()[1:]]
m = sum(r[0] for r in rows) / len(rows)
# log weights 50 and 860: only the second component, N(3 + 4 * 20, 4), is left; its mean is 83.
assert abs(m - 83.0) < 0.2, m
PY
then pass "a linear tilt at lambda = 20 keeps the component that holds the mass"; else fail "the strong linear tilt"; fi
expect_error "eval --reference beside an exact target" "--reference 'strong.csv': the config has an exact target" \
  "$tilt" eval -c strong.toml -s strong.csv --reference strong.csv
python3 -c "
print('x0,x1,c0')
for i in range(50): print(f'{i * 0.1},0.5,{i % 2}')" > conditional.csv
expect_error "eval of conditional samples against an unconditional config" "holds conditions" \
  "$tilt" eval -c strong.toml -s conditional.csv
# logz --method noising needs p_base's density, not a closed-form p*: a gmm reward at lambda = 2 has none, and the
# estimate agrees with escorted Jarzynski's. A proposal whose noise does not match the noising kernels leaves a few
# paths with the weight: a warning says the estimate is not to be trusted.
sed 's/^type = "quadratic"$/type = "gmm"\nmeans = [[1.0, 0.0]]\nstd = 1.0\nlambda = 2.0/; /^center = /d; /^precision = /d' \
  tiny.toml > gmm_reward.toml
if "$tilt" logz -c gmm_reward.toml --method noising -n 4000 -q --json > lz_n.json 2> lz.err &&
   "$tilt" logz -c gmm_reward.toml --method jarzynski -n 4000 -q --json > lz_j.json 2>> lz.err && python3 - <<'PY'
import json
n, j = json.load(open("lz_n.json")), json.load(open("lz_j.json"))
assert "exact_log_z" not in n, n
se = (n["log_z_standard_error"] ** 2 + j["log_z_standard_error"] ** 2) ** 0.5
assert abs(n["log_z"] - j["log_z"]) < 4 * se, (n, j)
PY
then pass "logz noising of a reward without a closed-form tilt"; else fail "logz noising, gmm reward: $(cat lz.err lz_*.json)"; fi
if "$tilt" logz -c tiny.toml --method noising --noise constant:1 -n 500 -q --json > lz_c.json 2> lz.err &&
   grep -q "a few paths hold the weight" lz.err && grep -q '"warning"' lz_c.json; then
  pass "logz warns when the ESS is under 1% of n"
else
  fail "no ESS warning: $(cat lz.err lz_c.json)"
fi
# Escorted Jarzynski runs on the ODE (the README's sigma = 0 row; --noise ode was refused for every method), and its
# O(1/steps) bias is said in --json as girsanov's is; girsanov and noising still need a path density.
if "$tilt" logz -c tiny.toml --method jarzynski --noise ode -n 500 --steps 20 -q --json > lz_o.json 2> lz.err &&
   python3 -c "import json, sys; r = json.load(open('lz_o.json')); sys.exit(0 if 'O(1/steps)' in r['bias'] else 1)"; then
  pass "logz jarzynski on the ODE, its bias said"
else
  fail "logz jarzynski --noise ode: $(cat lz.err lz_o.json)"
fi
expect_error "logz girsanov on the ODE" "girsanov weights need a stochastic schedule (--method jarzynski takes the ODE)" \
  "$tilt" logz -c tiny.toml --noise ode -n 100 -q
# Every [finetune] key has a default: a config without the table starts a run (stopped after 10 s).
tiny_config 1 1 > no_table.toml
timeout 10 "$tilt" finetune -q -c no_table.toml -o no_table > /dev/null 2>&1
if python3 -c "import json; assert json.load(open('no_table/config.resolved.json'))['finetune']['preset'] == 'small'"; then
  pass "finetune without a [finetune] table takes the defaults"
else
  fail "finetune without [finetune]: $(ls no_table 2>&1)"
fi
expect_error "a ring of negative radius" "'data.radius' must be > 0" \
  "$tilt" sample --exact base -c tiny.toml --set data.radius=-3 -n 10 -o s.csv
expect_error "mcmc: thin above steps keeps no sample" "'mcmc.thin' must be at most steps" \
  "$tilt" mcmc -c "$configs/as_double_well.toml" --set mcmc.thin=100000 --set mcmc.steps=10 -o mc.csv -q
expect_error "dw4 with a <= 0 has no lower bound" "'energy.a' must be > 0" \
  "$tilt" mcmc -c "$configs/as_dw4.toml" --set energy.a=-1 -o mc.csv -q
expect_nothing_written "refused mcmc" mc.csv
# What only the method refuses (sigma = 0 where Adjoint Matching divides by it) is refused before the run directory is
# made, naming the file and the table.
expect_error "adjoint matching on sigma = 0" "in 'tiny.toml' (with the command line's --set, --seed or --threads): [finetune] (method = adjoint_matching): adjoint matching needs sigma(t) > 0" \
  "$tilt" finetune -q -c tiny.toml --set finetune.noise=constant:0 -o sigma0
expect_error "the discrete adjoint on the ODE" "[finetune] (method = discrete_adjoint): discrete_adjoint needs sigma(t) > 0" \
  "$tilt" finetune -q -c tiny.toml --set finetune.method=discrete_adjoint --set finetune.noise=ode -o sigma0
expect_absent "no run directory for a refused method" sigma0
# A model file's samples read no config: -c or --set with -m was silently ignored (its seed too).
"$tilt" finetune -q -c tiny.toml --set finetune.iterations=2 -o m2 > /dev/null 2>&1
expect_error "sample -m with -c" "--config is read by --exact only" "$tilt" sample -m m2/model.pt -c tiny.toml -n 5 -o s.csv
expect_error "sample -m with --set" "--set is read by --exact only" "$tilt" sample -m m2/model.pt --set seed=7 -n 5 -o s.csv
expect_nothing_written "refused sample" s.csv
# tilt soc names the key and the file of an unknown loss.
printf '[soc]\nproblem = "quadratic_ou_easy"\nlosses = ["adjoint_matchin"]\n' > soc_typo.toml
expect_error "an unknown SOC loss in a config" "in 'soc_typo.toml': 'soc.losses': unknown SOC loss 'adjoint_matchin'" \
  "$tilt" soc -c soc_typo.toml -o soc_typo

finish
