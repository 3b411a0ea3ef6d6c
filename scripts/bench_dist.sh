#!/usr/bin/env bash
# Speed of data-parallel training on this machine: the same run (same seed, same 2 shards, so the
# same result) as 1 process and as 2 processes on 127.0.0.1, plus 1 process using 2 threads.
# Prints a Markdown table of the median seconds per iteration and the wall time.
# Usage: scripts/bench_dist.sh [iterations] [config]   (defaults: 200, configs/demo_2d.toml)
set -euo pipefail
cd "$(dirname "$0")/.."
tilt=$(realpath build/bin/tilt)
iterations=${1:-200}
config=$(realpath "${2:-configs/demo_2d.toml}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
common=(finetune -q -c "$config" --set finetune.iterations="$iterations" --set finetune.checkpoint_every=0
        --set finetune.shards=2)

# median seconds per iteration (metrics.jsonl) and wall seconds of one run directory
report() {
  python3 - "$work/$1/metrics.jsonl" "$2" "$3" <<'PY'
import json, statistics, sys
s = [json.loads(l)["seconds"] for l in open(sys.argv[1])]
print(f"| {sys.argv[3]} | {1e3 * statistics.median(s):.1f} | {float(sys.argv[2]):.1f} |")
PY
}

wall() { local t0; t0=$(date +%s.%N); "$@"; echo "$(date +%s.%N) - $t0" | bc; }

t1=$(wall env OMP_NUM_THREADS=1 "$tilt" "${common[@]}" --set threads=1 -o "$work/one" 2>/dev/null)
t2=$(wall bash -c "
  env OMP_NUM_THREADS=1 WORLD_SIZE=2 RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
    '$tilt' ${common[*]@Q} --set threads=1 -o '$work/two' 2>/dev/null &
  env OMP_NUM_THREADS=1 WORLD_SIZE=2 RANK=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
    '$tilt' ${common[*]@Q} --set threads=1 -o '$work/two' 2>/dev/null
  wait")
t3=$(wall "$tilt" "${common[@]}" --set threads=2 -o "$work/threads" 2>/dev/null)

echo "| $(basename "$config"), $iterations iterations, 2 shards | ms / iteration (median) | wall s |"
echo "|---|---|---|"
report one "$t1" "1 process, 1 thread"
report two "$t2" "2 processes (Gloo, 127.0.0.1), 1 thread each"
report threads "$t3" "1 process, 2 threads"
cmp -s <(cut -d, -f1-3 "$work/one/metrics.jsonl") <(cut -d, -f1-3 "$work/two/metrics.jsonl") ||
  echo "warning: the 2-process run's losses differ from the 1-process run's" >&2
echo
echo "load average during the runs: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores"
