#!/usr/bin/env bash
# The fuzz corpus (tests/fuzz/cases.tsv; README.md there): every malformed config, corrupt file and bad
# flag must make tilt exit with code 1 (not a signal, not 0, not a hang past 30 s), print exactly one
# line "tilt: error: ..." naming the key or the file, and change nothing in the existing run
# directories (nor, for a config error, create the fresh output).
#
# Usage: fuzz_test.sh path/to/tilt path/to/repo [path/to/tilt_fork_server path/to/tilt_fork_client]
# With the fork server and its client (fork_server.cpp), each case's tilt is a fork of one process that
# started LibTorch once (~0.65 s of CPU saved per case); the fixtures are made by the real binary.
# Environment: FUZZ_FORK=0 runs every case as a fresh process even so;
# FUZZ_ONLY=REGEX runs the cases whose names match (the fixtures are always made);
# FUZZ_JOBS=N cases at once (default: the number of cores + 1); FUZZ_TIMEOUT=30 seconds per case;
# FUZZ_MEM_KB=2097152 address-space limit per case (ulimit -v), so that a case that allocates
# without bound fails instead of taking the machine's memory; FUZZ_KEEP=1 keeps the work directory.
set -uo pipefail
tilt=$(realpath "$1")
repo=$(realpath "$2")
server=${3:+$(realpath "$3")}
client=${4:+$(realpath "$4")}
fuzz=$repo/tests/fuzz
jobs=${FUZZ_JOBS:-$(($(nproc) + 1))}  # one more than the cores: a hung case waits, it does not compute
only=${FUZZ_ONLY:-}
case_timeout=${FUZZ_TIMEOUT:-30}
mem_kb=${FUZZ_MEM_KB:-2097152}
work=$(mktemp -d "${TMPDIR:-/tmp}/tilt-fuzz.XXXXXX")
server_pid=""
finish() {
  [ -n "$server_pid" ] && kill "$server_pid" 2> /dev/null
  [ "${FUZZ_KEEP:-0}" = 1 ] || rm -rf "$work"
}
trap finish EXIT
[ "${FUZZ_KEEP:-0}" = 1 ] && echo "fuzz: work directory $work"
start=$SECONDS

# ---------------------------------------------------------------------------------------------
# Fixtures, made once by this build: valid inputs the cases corrupt or point at, and two run
# directories that no case may change (runs/done: a finished run; runs/paused: a run stopped after
# its first of two iterations, with its checkpoint). Each base config is checked to work as given,
# so that a case fails only for its own mistake.
pristine=$work/pristine
mkdir -p "$pristine/fx/adir" "$pristine/runs" "$pristine/mk"
cp "$fuzz"/base/*.toml "$fuzz"/files/*.ts "$pristine/fx/"
cp "$repo/data/digits/digits.csv.gz" "$pristine/fx/"
cd "$pristine" || exit 1
fixture() {  # fixture DESCRIPTION command...
  local what=$1; shift
  if ! "$@" > mk/log.txt 2>&1 < /dev/null; then
    echo "FAIL fixture: $what: $* ($(tail -3 mk/log.txt | tr '\n' ' '))"
    echo "0 passed, 1 failed"
    exit 1
  fi
}
fixture "pretrain (2-D)" "$tilt" pretrain -q -c fx/pt.toml -o mk/pt
cp mk/pt/model.pt fx/pmodel.pt
fixture "finetune (runs/done)" "$tilt" finetune -q -c fx/ft.toml -o runs/done
cp runs/done/model.pt fx/model.pt
fixture "finetune (runs/paused)" "$tilt" finetune -q -c fx/ft.toml --set finetune.iterations=1 -o runs/paused
rm -f runs/paused/model.pt runs/paused/training*.png  # as if stopped after its first checkpoint
fixture "export" "$tilt" export -m fx/pmodel.pt -o fx/base.ts
fixture "sample" "$tilt" sample -m fx/model.pt -n 64 --steps 5 -o fx/samples.csv
fixture "pretrain (digits)" "$tilt" pretrain -q -c fx/ptd.toml -o mk/ptd
cp mk/ptd/model.pt fx/dmodel.pt
fixture "classifier" "$tilt" classifier -q -c fx/cl.toml -o mk/cl
cp mk/cl/classifier.pt fx/classifier.pt
fixture "sample (digits)" "$tilt" sample -m fx/dmodel.pt -n 16 --steps 4 -o fx/dsamples.csv
fixture "base ftm.toml" "$tilt" finetune -q -c fx/ftm.toml -o mk/ftm
fixture "base fts.toml" "$tilt" finetune -q -c fx/fts.toml -o mk/fts
cp mk/fts/model.pt fx/tsmodel.pt
fixture "base ftr.toml" "$tilt" finetune -q -c fx/ftr.toml -o mk/ftr
fixture "base ftd.toml" "$tilt" finetune -q -c fx/ftd.toml -o mk/ftd
fixture "base ptc.toml" "$tilt" pretrain -q -c fx/ptc.toml -o mk/ptc
fixture "base ei.toml" "$tilt" eval-images -c fx/ei.toml -s fx/dsamples.csv
fixture "base as.toml" "$tilt" adjoint-sampling -q -c fx/as.toml -o mk/as
cp mk/as/model.pt fx/ascontrol.pt
fixture "base mc.toml" "$tilt" mcmc -q -c fx/mc.toml -o mk/mc.csv
fixture "sample --exact with ft.toml" "$tilt" sample --exact target -c fx/ft.toml -n 10 -o mk/exact.csv
fixture "eval with ft.toml" "$tilt" eval -c fx/ft.toml -s fx/samples.csv --replicates 1
fixture "logz with ft.toml" "$tilt" logz -q -c fx/ft.toml -n 8 --steps 4
fixture "soc" "$tilt" soc -q -l moment --iterations 1 --batch 8 --eval-batch 8 --hidden 4 -o mk/soc
fixture "plot" "$tilt" plot fx/samples.csv -o mk/plot.png
rm -rf mk
cd "$work" || exit 1
fixture_seconds=$((SECONDS - start))

# A hung case through the fork server, under `timeout` (its SIGTERM forwarded to tilt) or `timeout -s KILL`
# (the stand-in dies; the server kills tilt): the exit code a fresh tilt would give, and nothing left running
# (the worker that ran it, a child of the server, ends once its tilt is dead).
hang_check() {  # hang_check EXPECTED_EXIT_CODE TIMEOUT_OPTIONS...
  local expected=$1 rc left
  shift
  timeout "$@" 1 "$client" soc -q -l moment --iterations 1000000 --batch 8 --eval-batch 8 --hidden 4 \
    -o "$work/canary$expected" > /dev/null 2>&1
  rc=$?
  for _ in $(seq 20); do
    left=$(awk -v server="$server_pid" '$4 == server' /proc/[0-9]*/stat 2> /dev/null)
    [ -z "$left" ] && break
    sleep 0.1
  done
  [ "$rc" -eq "$expected" ] && [ -z "$left" ]
}

# The cases' tilt: the fork server's client, once the server listens (or the real binary).
how="fresh processes"
if [ -n "$server" ] && [ -n "$client" ] && [ "${FUZZ_FORK:-1}" != 0 ]; then
  "$server" "$work/fork.sock" "$tilt" < /dev/null > "$work/server.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 100); do [ -S "$work/fork.sock" ] && break; kill -0 "$server_pid" 2> /dev/null || break; sleep 0.05; done
  if [ -S "$work/fork.sock" ]; then
    export TILT_FORK_SERVER=$work/fork.sock
    # The stand-in runs tilt, and a case that hangs is still killed by `timeout`, the forked tilt with it.
    canary=$("$client" --version 2>&1)
    if [ "$canary" != "$("$tilt" --version 2>&1)" ]; then
      echo "FAIL fork server: --version through it gave: $(head -c 300 <<< "$canary")"
      exit 1
    fi
    if ! hang_check 124 -k 2 2> /dev/null || ! hang_check 137 -s KILL 2> /dev/null; then
      echo "FAIL fork server: a case killed by timeout did not end as a fresh tilt would, or its tilt lives on"
      exit 1
    fi
    tilt=$client
    how="a fork server"
  else  # (it refuses to fork a LibTorch that started threads): the slow way, said so
    echo "fuzz: the fork server did not start ($(head -c 300 "$work/server.log")); every case runs a fresh tilt"
    kill "$server_pid" 2> /dev/null
    server_pid=""
  fi
fi

# Every file and directory under runs/ and fx/ of a case, with the files' hashes. A run's lock file
# (run.lock) holds the PID of the last process that locked the run, so only its presence counts.
# (The harness spends ~0.1 s of processes per case, three of them here: 600 cases make it count.)
snapshot() {
  (cd "$1" && find runs fx \( -type d -printf 'dir %p\n' \) -o \( -name run.lock -printf 'lock %p\n' \) \
    -o -exec sha256sum {} +) | LC_ALL=C sort
}
# A case's fixtures are a copy of these: a case without a setup step starts from this snapshot.
pristine_snapshot=$(snapshot "$pristine")

# ---------------------------------------------------------------------------------------------
# One case, in its own directory (a copy of the fixtures): prints "ok   NAME" or "FAIL NAME (why)".
run_case() {
  local name=$1 setup=$2 checks=$3 expect=$4 command=$5
  local dir=$work/cases/$name
  mkdir -p "$dir/new"
  cp -a "$pristine/fx" "$pristine/runs" "$dir/"
  cd "$dir" || return
  local cfg="" bad="" problems=()
  if [[ $command == *"{cfg}"* || $expect == *"{cfgname}"* ]]; then
    local found=("$fuzz/configs/$name".*)
    if [ ${#found[@]} -ne 1 ] || [ ! -f "${found[0]}" ]; then
      echo "FAIL $name (corpus: no single config file tests/fuzz/configs/$name.*)"
      return
    fi
    cfg=${found[0]}
  fi
  if [ "$setup" != "-" ]; then
    if ! bad=$(python3 "$fuzz/make_input.py" "$setup" "$name" 2> setup.err); then
      echo "FAIL $name (corpus: setup '$setup' failed: $(head -c 300 setup.err))"
      return
    fi
  fi
  local before=$pristine_snapshot
  [ "$setup" != "-" ] && before=$(snapshot "$dir")
  # Placeholders; paths are shell-quoted, as the command line is run by bash.
  local configs=$fuzz/configs files=$fuzz/files
  command=${command//"{tilt}"/${tilt@Q}}
  command=${command//"{cfg}"/${cfg@Q}}
  command=${command//"{c}"/${configs@Q}}
  command=${command//"{files}"/${files@Q}}
  command=${command//"{out}"/new/out}
  command=${command//"{bad}"/${bad@Q}}
  local t0=$SECONDS rc
  (ulimit -v "$mem_kb"; exec timeout -k 5 "$case_timeout" bash -c "$command") > stdout.txt 2> stderr.txt < /dev/null
  rc=$?
  local elapsed=$((SECONDS - t0))
  if [ $rc -eq 124 ] || { [ $rc -eq 137 ] && [ $elapsed -ge "$case_timeout" ]; }; then
    problems+=("hang: killed after ${case_timeout} s")
  elif [ $rc -gt 128 ]; then
    problems+=("signal: SIG$(kill -l $((rc - 128)) 2> /dev/null || echo $((rc - 128)))")
  elif [ $rc -eq 0 ]; then
    problems+=("exit 0: accepted")
  elif [ $rc -ne 1 ]; then
    problems+=("exit $rc")
  fi
  # stderr: warnings and notes ("tilt: ...") may come first; then exactly one "tilt: error: ..." line.
  local errors=0 stray="" line="" text
  while IFS= read -r text || [ -n "$text" ]; do
    if [[ $text == "tilt: error:"* ]]; then
      errors=$((errors + 1))
      [ -z "$line" ] && line=$text
    elif [[ -n $text && $text != "tilt: "* && -z $stray ]]; then
      stray=$text
    fi
  done < stderr.txt 2> /dev/null  # (NUL bytes are dropped, the rest of their line read as text)
  if [ $rc -ne 0 ] && [ "$errors" -eq 0 ]; then
    problems+=("message: no 'tilt: error:' line; stderr ends: $(tail -c 300 stderr.txt | tr '\n' ' ')")
  elif [ "$errors" -gt 1 ]; then
    problems+=("message: $errors 'tilt: error:' lines")
  fi
  if [ -n "$stray" ]; then
    problems+=("message: a line not from tilt on stderr: $(head -c 200 <<< "$stray")")
  fi
  if [ "$errors" -ge 1 ]; then
    local alt matched=0 key
    IFS='|' read -r -a alts <<< "$expect"
    for alt in "${alts[@]}"; do
      if [[ $alt == key:* ]]; then
        # A key (or flag) must be named as such: not inside a longer name, and not only in the config's path.
        text=${line//"$cfg"/}
        [ -n "$cfg" ] && text=${text//"${cfg##*/}"/}
        key=${alt#key:}
        # (the quoted part of a bash regex matches literally)
        [[ $text =~ (^|[^A-Za-z0-9_.-])"$key"([^A-Za-z0-9_]|$) ]] && matched=1
      else
        alt=${alt//"{bad}"/$bad}
        alt=${alt//"{out}"/new/out}
        [ -n "$cfg" ] && alt=${alt//"{cfgname}"/${cfg##*/}}
        [[ $line == *"$alt"* ]] && matched=1
      fi
    done
    if [ $matched -eq 0 ]; then
      problems+=("message: does not name ${expect//key:/}: $(head -c 300 <<< "$line")")
    fi
  fi
  # Nothing changed in the existing run directories and fixtures.
  local after
  after=$(snapshot "$dir")
  if [ "$before" != "$after" ]; then
    local changed
    changed=$(diff <(echo "$before") <(echo "$after") | grep '^[<>]' | awk '{print $NF}' | sort -u | head -5 | tr '\n' ' ')
    problems+=("run dir changed: $changed")
  fi
  # A config or flag error is found before anything is written: the fresh output is not created.
  if [ "$checks" = clean ]; then
    local created
    created=$(find new -mindepth 1 ! \( -path new/out -type d -empty \) -printf '%P' -quit)
    [ -n "$created" ] && problems+=("output created: $created")
  fi
  if [ ${#problems[@]} -eq 0 ]; then
    echo "ok   $name"
  else
    local why
    why=$(printf '%s; ' "${problems[@]}")
    echo "FAIL $name (${why%; }) [${elapsed} s: ${command//$tilt/tilt}]"
  fi
  cd "$work" && rm -rf "$dir"
}

# ---------------------------------------------------------------------------------------------
mkdir -p results
count=0 running=0
while IFS=$'\t' read -r name setup checks expect command; do
  [[ -z $name || $name == \#* ]] && continue
  printf -v result 'results/%05d' "$count"
  if [ -z "$command" ]; then echo "FAIL $name (corpus: malformed line in cases.tsv)" > "$result"; count=$((count + 1)); continue; fi
  if [ -n "$only" ] && ! [[ $name =~ $only ]]; then continue; fi
  if [ "$running" -ge "$jobs" ]; then wait -n; running=$((running - 1)); fi
  run_case "$name" "$setup" "$checks" "$expect" "$command" > "$result" &
  running=$((running + 1))
  count=$((count + 1))
done < "$fuzz/cases.tsv"
for pid in $(jobs -p); do  # the cases still running (not the fork server)
  [ "$pid" = "$server_pid" ] || wait "$pid"
done
cat results/* 2> /dev/null
passed=$(cat results/* 2> /dev/null | grep -c '^ok ')
failed=$(cat results/* 2> /dev/null | grep -c '^FAIL ')
echo "fuzz: $count cases in $((SECONDS - start)) s (fixtures ${fixture_seconds} s), $jobs at a time, tilt from $how"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$count" -gt 0 ]
