#!/usr/bin/env bash
# What survives: a run directory and the files a command reads, against a second writer, kill -9,
# a full disk (as root, on a small tmpfs; skipped with a message otherwise), a failed resume and an
# output path that names an input. Usage: run_files_test.sh path/to/tilt
set -uo pipefail
source "$(dirname "$(realpath "$0")")/lib.sh"
tilt=$(realpath "$1")
work=$(mktemp -d)
disk="$work/disk"
cleanup() {
  mountpoint -q "$disk" 2>/dev/null && umount -l "$disk"
  rm -rf "$work"
}
trap cleanup EXIT
cd "$work"
hashes() { find "$@" -type f ! -name run.lock -print0 | sort -z | xargs -0 md5sum; }

{ tiny_config 1 1; cat <<'TOML'
[finetune]
preset = "paper"  # the tests of the machinery assume the paper's defaults: a constant lr, the control weighting
hidden = [32, 32]
num_steps = 10
batch_size = 16
iterations = 6
loss_early_steps = 3
loss_late_steps = 3
clip_factor = 0.0
checkpoint_every = 2
TOML
} > tiny.toml
"$tilt" finetune -q -c tiny.toml -o run > log.txt 2>&1 || fail "the setup run: $(cat log.txt)"

# 1. An output that names an input is refused before anything is written.
before=$(hashes run)
expect_error "sample -o over its --model" "--out 'run/model.pt' is also --model 'run/model.pt'" \
  "$tilt" sample -m run/model.pt -n 10 -o run/model.pt
expect_error "sample --png over --out" "is also --png" "$tilt" sample -m run/model.pt -n 10 -o s.csv --png s.csv
expect_error "export -o over its --model (another spelling)" "is also --model" \
  "$tilt" export -m run/model.pt -o ./run/../run/model.pt
expect_error "export --reference over --model" "--reference 'run/model.pt' is also --model" \
  "$tilt" export -m run/model.pt -o m.ts --reference run/model.pt
"$tilt" sample -m run/model.pt -n 10 -o s.csv > /dev/null 2>&1
cp s.csv s_copy.csv
expect_error "plot -o over a panel" "is also the samples file 's.csv'" "$tilt" plot -o s.csv s.csv:one
cmp -s s.csv s_copy.csv && pass "the samples survive" || fail "plot overwrote its input"
expect_error "a config whose base is among the run's outputs" "'base.path' = 'run2/model.pt' is a file this run writes" \
  bash -c "mkdir -p run2 && cp run/model.pt run2/model.pt && \"$tilt\" finetune -q -c tiny.toml --set base.type=model --set base.path=run2/model.pt -o run2"
expect_error "sample -o a directory" "cannot write 'run': it is a directory" "$tilt" sample -m run/model.pt -n 10 -o run
[ "$before" = "$(hashes run)" ] && pass "run directory untouched by refused commands" || fail "run directory changed"

# 2. A second writer is refused, naming the first's PID; kill -9 releases the lock and the temporary
# files it leaves are removed by the next start.
"$tilt" finetune -q -c tiny.toml --set finetune.iterations=100000 --set finetune.checkpoint_every=1 -o long > long.log 2>&1 &
pid=$!
for _ in $(seq 300); do [ -f long/checkpoint.pt ] && break; sleep 0.1; done  # (up to 30 s: a busy machine)
expect_error "a second writer is refused, naming the first" "is in use by another tilt process (PID $pid)" \
  "$tilt" finetune -q -c tiny.toml --set finetune.iterations=100000 -o long --resume
kill -9 $pid; wait $pid 2>/dev/null
echo "half a checkpoint" > "long/checkpoint.pt.tmp.$pid"
echo "half a model" > "long/model.pt.tmp.$pid"
# Resumed past the killed run's last iteration (its metrics line comes before its checkpoint), a few more.
done_so_far=$(python3 -c 'import json, sys
n = 0
for line in open(sys.argv[1]):
    try:
        n = max(n, json.loads(line)["iteration"])
    except (ValueError, KeyError, TypeError):
        pass
print(n)' long/metrics.jsonl)
if "$tilt" finetune -q -c tiny.toml --set finetune.iterations=$((done_so_far + 2)) -o long --resume > log.txt 2>&1 &&
   [ -z "$(ls long | grep '\.tmp\.')" ]; then
  pass "after kill -9 the run resumes and its stale temporary files are gone"
else
  fail "resume after kill -9: $(cat log.txt; ls long)"
fi
# Resumed with fewer iterations than its checkpoint holds, the run is refused (it would have been written as the
# shorter run's model) and left as it was.
before=$(hashes long)
expect_error "a resume with fewer iterations than the checkpoint's is refused" \
  "is at iteration $((done_so_far + 2)), past the 1 iterations asked for" \
  "$tilt" finetune -q -c tiny.toml --set finetune.iterations=1 -o long --resume
[ "$before" = "$(hashes long)" ] && pass "the refused resume changed nothing" || fail "the refused resume changed 'long'"

# 2b. Buffered Adjoint Matching keeps its trajectories in the checkpoint: killed (-9) in the middle of a buffer's
# passes and resumed, it ends where an uninterrupted run of the same length ends, loss for loss.
buf=(--set finetune.adjoint_matching.buffer_size=64 --set finetune.adjoint_matching.buffer_passes=3
     --set finetune.checkpoint_every=1)
"$tilt" finetune -q -c tiny.toml "${buf[@]}" --set finetune.iterations=100000 -o buf_killed > buf.log 2>&1 &
pid=$!
for _ in $(seq 600); do [ -f buf_killed/metrics.jsonl ] && [ "$(wc -l < buf_killed/metrics.jsonl)" -ge 5 ] && break; sleep 0.05; done
kill -9 $pid; wait $pid 2>/dev/null
total=$(( $(wc -l < buf_killed/metrics.jsonl) + 7 ))
last_loss() { tail -1 "$1/metrics.jsonl" | python3 -c 'import json, sys; j = json.load(sys.stdin); print(j["iteration"], j["loss"], j["buffer_age"])'; }
if "$tilt" finetune -q -c tiny.toml "${buf[@]}" --set finetune.iterations=$total -o buf_killed --resume > log.txt 2>&1 &&
   "$tilt" finetune -q -c tiny.toml "${buf[@]}" --set finetune.iterations=$total -o buf_straight > log2.txt 2>&1 &&
   [ "$(last_loss buf_killed)" = "$(last_loss buf_straight)" ]; then
  pass "buffered adjoint matching resumes after kill -9 exactly ($(last_loss buf_killed))"
else
  fail "buffered resume after kill -9: $(cat log.txt log2.txt; last_loss buf_killed; last_loss buf_straight)"
fi

# 2c. tilt soc, killed (-9) in its first loss and resumed with --resume (the first loss from its checkpoint, the
# second from the start), ends where an uninterrupted run ends: the same evaluations (curves) and the same last
# loss, for both losses.
soc=(soc -q -p linear_ou -l adjoint_matching -l log_variance --eval-every 3 --eval-batch 32 --batch 16 --hidden 8
     --threads 1 --checkpoint-every 2)
"$tilt" "${soc[@]}" --iterations 100000 -o soc_killed > soc.log 2>&1 &
pid=$!
for _ in $(seq 1200); do [ -f soc_killed/adjoint_matching.jsonl ] && [ "$(wc -l < soc_killed/adjoint_matching.jsonl)" -ge 5 ] && break; sleep 0.05; done
kill -9 $pid; wait $pid 2>/dev/null
total=$(( $(wc -l < soc_killed/adjoint_matching.jsonl) + 7 ))
soc_state() { for l in log_variance adjoint_matching; do
  python3 -c 'import json, sys; print([json.loads(x)["control_l2_error"] for x in open(sys.argv[1])], json.loads(open(sys.argv[2]).read().splitlines()[-1])["loss"])' \
    "$1/$l.eval.jsonl" "$1/$l.jsonl"; done; }
if "$tilt" "${soc[@]}" --iterations $total -o soc_killed --resume > log.txt 2>&1 && grep -q "resumed adjoint_matching at iteration" log.txt &&
   "$tilt" "${soc[@]}" --iterations $total -o soc_straight > log2.txt 2>&1 &&
   [ "$(soc_state soc_killed)" = "$(soc_state soc_straight)" ] && [ -z "$(ls soc_killed | grep '\.tmp\.')" ]; then
  pass "tilt soc resumes after kill -9 exactly (curves and last losses of both losses)"
else
  fail "soc resume after kill -9: $(cat log.txt log2.txt; soc_state soc_killed; soc_state soc_straight)"
fi

# 3. A failed resume changes nothing; a run that stopped before its first checkpoint can be rerun.
cp -r run damaged
printf 'x' | dd of=damaged/checkpoint.pt bs=1 seek=2000 conv=notrunc 2>/dev/null
before=$(hashes damaged)
expect_error "a damaged checkpoint is refused" "checkpoint 'damaged/checkpoint.pt' is damaged" \
  "$tilt" finetune -q -c tiny.toml --set finetune.iterations=8 --set finetune.lr=1e-4 -o damaged --resume
[ "$before" = "$(hashes damaged)" ] && pass "the failed resume rewrote nothing (config.resolved.json included)" ||
  fail "the failed resume changed the run directory"
mkdir -p early && cp run/config.resolved.json early/ && echo '{"iteration": 1}' > early/metrics.jsonl
if "$tilt" finetune -q -c tiny.toml --set finetune.lr=1e-4 -o early > log.txt 2>&1 && [ -f early/model.pt ] &&
   grep -q "stopped before its first checkpoint; starting it afresh" log.txt &&
   grep -q '"lr": 0.0001' early/config.resolved.json; then
  pass "a run with no checkpoint is started afresh with the fixed config"
else
  fail "rerun of a run without a checkpoint: $(cat log.txt)"
fi

# A run started before the per-method tables (its config.resolved.json has the method's keys in [finetune])
# resumes; a changed method key is still refused, a changed clip_factor (an optimisation setting) is not.
cp -r run flat
python3 - flat/config.resolved.json <<'PY'
import json, sys
path = sys.argv[1]
j = json.load(open(path))
f = j["finetune"]
f.update(f.pop(f["method"]))
json.dump(j, open(path, "w"), indent=2)
PY
if "$tilt" finetune -q -c tiny.toml --set finetune.iterations=8 --set finetune.clip_factor=2 --threads 2 -o flat \
     --resume > log.txt 2>&1 && grep -q "clip_factor" log.txt && grep -q "threads 1 -> 2" log.txt; then
  pass "a run whose resolved config predates the method tables resumes (clip_factor and --threads may change)"
else
  fail "resume of a run with flat [finetune] keys: $(cat log.txt)"
fi
expect_error "a changed method key is refused on resume" "finetune.adjoint_matching.loss_weighting" \
  "$tilt" finetune -q -c tiny.toml --set finetune.iterations=9 --set finetune.adjoint_matching.loss_weighting=velocity \
  -o flat --resume

# A mixture's default std is recorded now; a run that did not record it resumes.
sed 's/^std = 0.5$//' tiny.toml > nostd.toml
"$tilt" finetune -q -c nostd.toml -o nostd > log.txt 2>&1 || fail "the run without std: $(cat log.txt)"
python3 - nostd/config.resolved.json <<'PY'
import json, sys
path = sys.argv[1]
j = json.load(open(path))
assert j["data"]["std"] == 1.0, j["data"]
del j["data"]["std"]
json.dump(j, open(path, "w"), indent=2)
PY
if "$tilt" finetune -q -c nostd.toml --set finetune.iterations=8 -o nostd --resume > log.txt 2>&1; then
  pass "data.std's default is recorded, and a run from before it resumes"
else
  fail "resume of a run without data.std: $(cat log.txt)"
fi

# A mixture reward's defaults (mixture, radius, std, weights) are recorded now; a run that did not record them resumes.
# A bad mixture is named as such (it was reported as 'reward.type').
grep -v '^center\|^precision' tiny.toml > ringreward.toml
ring=(--set reward.type=gmm --set reward.components=3)
"$tilt" finetune -q -c ringreward.toml "${ring[@]}" --set reward.mixture=ring -o ringr > log.txt 2>&1 ||
  fail "the run with a ring reward: $(cat log.txt)"
python3 - ringr/config.resolved.json <<'PY'
import json, sys
path = sys.argv[1]
j = json.load(open(path))
r = j["reward"]
assert r["radius"] == 3.0 and r["std"] == 1.0 and r["weights"] == [1.0, 1.0, 1.0] and r["type"] == "gmm", r
for key in ("radius", "std", "weights"):
    del r[key]
json.dump(j, open(path, "w"), indent=2)
PY
if "$tilt" finetune -q -c ringreward.toml "${ring[@]}" --set reward.mixture=ring --set finetune.iterations=8 -o ringr \
     --resume > log.txt 2>&1; then
  pass "a mixture reward's defaults are recorded, and a run from before them resumes"
else
  fail "resume of a run without the reward's defaults: $(cat log.txt)"
fi
expect_error "a bad reward mixture is named" "'reward.mixture' is 'square', which is not one of: gmm, ring" \
  "$tilt" finetune -q -c ringreward.toml "${ring[@]}" --set reward.mixture=square -o ringbad

# 3b. A finished run whose checkpoint was removed is not resumed from iteration 0 over its model.
cp -r run finished && rm finished/checkpoint.pt
before=$(hashes finished)
expect_error "--resume without checkpoint.pt beside model.pt is refused" "holds model.pt but no checkpoint.pt" \
  "$tilt" finetune -q -c tiny.toml --set finetune.iterations=8 -o finished --resume
[ "$before" = "$(hashes finished)" ] && pass "the finished model is kept" || fail "the refused resume changed the run"

# 3c. Paths that are not plain files: a symbolic link is written through (the link stays), a pipe or a device is
# refused (renaming over it would replace it), a path ending in / names a directory.
ln -s target.csv link.csv
if "$tilt" sample -m run/model.pt -n 10 -o link.csv > /dev/null 2>&1 && [ -L link.csv ] && [ -f target.csv ] &&
   [ "$(wc -l < target.csv)" -eq 11 ]; then
  pass "sample -o a symbolic link writes the file it names"
else
  fail "sample -o through a link: $(ls -l link.csv target.csv 2>&1)"
fi
mkfifo pipe
expect_error "sample -o a named pipe" "cannot write 'pipe': it is not a regular file" \
  "$tilt" sample -m run/model.pt -n 10 -o pipe
[ -p pipe ] && pass "the pipe is still a pipe" || fail "the pipe was replaced"
expect_error "sample -o /dev/stdout into a pipe" "names one of the process's open files" \
  bash -c "set -o pipefail; \"$tilt\" sample -m run/model.pt -n 10 -o /dev/stdout | cat"
expect_error "sample -o /dev/stdout into a file" "names one of the process's open files" \
  bash -c "\"$tilt\" sample -m run/model.pt -n 10 -o /dev/stdout > redirected.txt"
expect_error "export -o a path ending in /" "it names a directory" "$tilt" export -m run/model.pt -o newdir/
expect_absent "no directory made for it" newdir
mkdir adir
expect_error "sample --png a directory" "cannot write 'adir': it is a directory" \
  "$tilt" sample -m run/model.pt -n 10 -o fresh.csv --png adir
expect_absent "nor the samples before it" fresh.csv

# 3d. Inputs that are devices are refused (/dev/zero never ends: read whole, it filled the memory); an output over a
# --conditions file, or over a file of a directory the config reads, is refused.
expect_error "a config that is a device" "it is a device or a socket, not a file" "$tilt" finetune -q -c /dev/zero -o zero
expect_error "a model that is a device" "it is a device or a socket, not a file" "$tilt" sample -m /dev/zero -n 5 -o z.csv
expect_error "samples that are a device" "it is a device or a socket, not a file" \
  "$tilt" eval -q -c tiny.toml -s /dev/zero
printf '1\n2\n' > conds.csv
expect_error "sample -o over its --conditions" "--out 'conds.csv' is also --conditions 'conds.csv'" \
  "$tilt" sample -m run/model.pt -n 2 --conditions conds.csv -o conds.csv
expect_error "sample --png over its --conditions" "--png 'conds.csv' is also --conditions 'conds.csv'" \
  "$tilt" sample -m run/model.pt -n 2 --conditions conds.csv -o c.csv --png conds.csv
[ "$(cat conds.csv)" = "$(printf '1\n2')" ] && pass "the conditions file survives" || fail "conditions file overwritten"
# A header naming more or fewer columns than the rows hold (a header from another file, or damaged).
printf 'x0\n1,2\n3,4\n' > hdr.csv
expect_error "a header of 1 column over rows of 2" "its header has 1 field(s), but its rows have 2 value(s)" \
  "$tilt" eval -q -c tiny.toml -s hdr.csv

# 3e. A resumed run reads what it began with: a base model replaced behind the same path is refused, naming the key;
# restored, the run resumes. A data set's directory is fingerprinted file by file (inputs.json).
mkdir -p inputs && cp run/model.pt inputs/base.pt
"$tilt" finetune -q -c tiny.toml --set base.type=model --set base.path=inputs/base.pt --set finetune.iterations=4 \
  -o on_base > log.txt 2>&1 || fail "the run on a base file: $(cat log.txt)"
grep -q '"base.path"' on_base/inputs.json && pass "inputs.json records the base file" || fail "inputs.json: $(cat on_base/inputs.json)"
cp long/model.pt inputs/base.pt 2>/dev/null || cp nostd/model.pt inputs/base.pt
before=$(hashes on_base)
expect_error "resume on a replaced base file" "the input 'base.path' = \"inputs/base.pt\" has changed since the run started" \
  "$tilt" finetune -q -c tiny.toml --set base.type=model --set base.path=inputs/base.pt --set finetune.iterations=6 \
  -o on_base --resume
[ "$before" = "$(hashes on_base)" ] && pass "the refused resume changed nothing" || fail "the refused resume changed on_base"
cp run/model.pt inputs/base.pt
if "$tilt" finetune -q -c tiny.toml --set base.type=model --set base.path=inputs/base.pt --set finetune.iterations=6 \
     -o on_base --resume > log.txt 2>&1; then
  pass "with the base restored, the run resumes"
else
  fail "resume with the base restored: $(cat log.txt)"
fi
fashion=/usr/share/datasets/fashion-mnist
if [ -f "$fashion/train-labels-idx1-ubyte.gz" ]; then
  mkdir -p fm && cp "$fashion"/train-*-ubyte.gz fm/
  cat > fm.toml <<'TOML'
seed = 0
threads = 1
[schedule]
type = "linear"
[data]
type = "fashion_mnist"
path = "fm"
limit = 200
[conditions]
classes = 10
[pretrain]
network = "unet"
channels = 4
channel_mult = [1, 2]
blocks = 1
groups = 2
iterations = 2
batch_size = 4
checkpoint_every = 1
TOML
  "$tilt" pretrain -q -c fm.toml -o fmrun > log.txt 2>&1 || fail "the Fashion-MNIST pretrain: $(cat log.txt)"
  # One label changed, the file's size kept: the data set the run began with is gone.
  python3 -c "
import gzip
p = 'fm/train-labels-idx1-ubyte.gz'
b = bytearray(gzip.open(p).read()); b[8] = (b[8] + 1) % 10
gzip.open(p, 'wb').write(bytes(b))"
  expect_error "resume on a changed data set" "its file 'train-labels-idx1-ubyte.gz' is different" \
    "$tilt" pretrain -q -c fm.toml --set pretrain.iterations=3 -o fmrun --resume
else
  pass "(skipped: no $fashion; scripts/setup.sh installs dataset-fashion-mnist) a changed data set is refused"
fi

# 4. A full disk (needs root for a small tmpfs).
if [ "$(id -u)" -ne 0 ] || ! { mkdir -p "$disk" && mount -t tmpfs -o size=1m tmpfs "$disk"; } 2>/dev/null; then
  echo "skip full-disk tests: they need root to mount a small tmpfs"
else
  ckpt=$(stat -c %s run/checkpoint.pt)
  # Room for the config, the metrics and one checkpoint but not for the second (written beside it).
  fill_leaving() {
    rm -f "$disk/filler"
    dd if=/dev/zero of="$disk/filler" bs=4k 2>/dev/null
    truncate -s -"$1" "$disk/filler"
  }
  fill_leaving $((ckpt * 3 / 2 + 16384))
  out=$("$tilt" finetune -q -c tiny.toml --set finetune.iterations=20 -o "$disk/run" 2>&1); rc=$?
  if [ $rc -eq 1 ] && grep -q "No space left on device" <<<"$out" && ! grep -q "terminate called" <<<"$out" &&
     [ -z "$(ls "$disk/run" | grep '\.tmp\.')" ] && grep -q "is intact" <<<"$out"; then
    pass "a full disk while checkpointing: exit 1, a message, no temporary file, the last checkpoint kept"
  else
    fail "checkpoint on a full disk (rc=$rc): $out"
  fi
  rm -f "$disk/filler"
  if "$tilt" finetune -q -c tiny.toml --set finetune.iterations=20 -o "$disk/run" --resume > log.txt 2>&1 &&
     [ -f "$disk/run/model.pt" ] && [ "$(wc -l < "$disk/run/metrics.jsonl")" -eq 20 ]; then
    pass "once space is freed, --resume finishes the run"
  else
    fail "resume after a full disk: $(cat log.txt)"
  fi
  rm -rf "$disk/run2"
  fill_leaving 12000
  out=$("$tilt" finetune -q -c tiny.toml --set finetune.iterations=2000 --set finetune.checkpoint_every=0 \
        -o "$disk/run2" 2>&1); rc=$?
  if [ $rc -eq 1 ] && grep -q "cannot write metrics file '$disk/run2/metrics.jsonl': No space left on device" <<<"$out" &&
     /usr/bin/env python3 -c "
import json, sys
lines = open(sys.argv[1]).read().split('\n')
assert lines[-1] == '', 'no newline at the end'
for i, line in enumerate(lines[:-1]): assert json.loads(line)['iteration'] == i + 1
" "$disk/run2/metrics.jsonl"; then
    pass "a full disk while writing metrics: exit 1, a message, only whole records"
  else
    fail "metrics on a full disk (rc=$rc): $out"
  fi
  rm -f "$disk/filler"
fi

finish
