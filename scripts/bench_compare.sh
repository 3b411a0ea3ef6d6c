#!/usr/bin/env bash
# The C++ Adjoint Matching iteration against its PyTorch reference (issue 5), in one go: builds the
# benchmarks if needed (as scripts/bench.sh does), then for each problem runs the C++ iteration
# (build/bench/tilt_bench: BM_Iteration, BM_Rollout, BM_LeanAdjoint) and the PyTorch reference
# (bench/reference/am_reference.py: the same iteration, networks, batch, K, loss steps, Adam) on the
# same number of threads, and prints Markdown tables: ms per iteration and the ratio, and where the
# time goes. Raw results go to build/bench_compare/. Run nothing else meanwhile: two OpenMP jobs on
# the same cores slow each other down by up to 10x.
#
#   scripts/bench_compare.sh [--threads N] [--repetitions R] [--min-time S] [--check] [--no-build]
#
#   --threads N      torch threads on both sides (default 2, or TILT_THREADS)
#   --repetitions R  C++: Google Benchmark repetitions, the median is reported (default 5)
#   --min-time S     C++: seconds per repetition (default 1); PyTorch: times R * S seconds of iterations
#   --check          first run the reference's correctness checks, against this C++ build too (~2-5 min)
#   --no-build       use the existing build/bench/tilt_bench
#
# Needs Debian's PyTorch for /usr/bin/python3 (apt-get install python3-torch; PYTHON=... to use another
# interpreter). It is only the comparison baseline: neither the build nor the tests need it.
set -euo pipefail
cd "$(dirname "$0")/.."

threads=${TILT_THREADS:-2}
reps=5
min_time=1
check=0
build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads=$2; shift 2 ;;
    --repetitions) reps=$2; shift 2 ;;
    --min-time) min_time=$2; shift 2 ;;
    --check) check=1; shift ;;
    --no-build) build=0; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "bench_compare: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

python=${PYTHON:-/usr/bin/python3}
if ! torch_version=$("$python" -c 'import torch; print(torch.__version__)' 2>/dev/null); then
  echo "bench_compare: the PyTorch reference needs torch for $python, and it is not installed." >&2
  echo "  Install Debian's build (PyTorch 1.13, the same version as libtorch-dev): apt-get install python3-torch" >&2
  echo "  The C++ benchmarks alone: scripts/bench.sh" >&2
  exit 3
fi

bench=build/bench/tilt_bench
if [ "$build" = 1 ]; then
  scripts/setup.sh >&2
  scripts/build.sh -DTILT_BUILD_BENCH=ON >&2
fi
if [ ! -x "$bench" ]; then
  echo "bench_compare: $bench is missing; run without --no-build" >&2
  exit 2
fi

out=build/bench_compare
mkdir -p "$out"
reference=bench/reference/am_reference.py

if [ "$check" = 1 ]; then
  echo "bench_compare: correctness checks of the reference (against $bench too)" >&2
  "$python" "$reference" --check --threads "$threads" --cpp-bench "$bench" | tee "$out/check.txt" >&2
fi

py_time=$(awk -v r="$reps" -v s="$min_time" 'BEGIN { print r * s }')
for p in 0 1; do
  name=$([ "$p" = 0 ] && echo 2d || echo 64d)
  echo "bench_compare: $name, C++ ($threads threads)" >&2
  TILT_THREADS=$threads "$bench" --benchmark_filter="^BM_(Rollout|LeanAdjoint|Iteration)/$p\$" \
    --benchmark_min_time="$min_time" --benchmark_repetitions="$reps" --benchmark_report_aggregates_only=true \
    --benchmark_format=json > "$out/cpp_$name.json"
  echo "bench_compare: $name, PyTorch $torch_version ($threads threads)" >&2
  "$python" "$reference" --problem "$name" --threads "$threads" --min-time "$py_time" > "$out/pytorch_$name.json"
done

"$python" - "$out" "$threads" "$reps" "$min_time" <<'EOF'
import json, os, platform, sys

out, threads, reps, min_time = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
names = {"2d": "2-D demo: exact 8-Gaussian base, residual MLP 3x128, K = 60, batch 256",
         "64d": "64-D: MLP base 3x256, residual MLP 3x256, K = 40, batch 256"}
scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}
rows = {}
for name in ("2d", "64d"):
    cpp, single = {}, {}
    for b in json.load(open(os.path.join(out, f"cpp_{name}.json")))["benchmarks"]:
        key = b["run_name"].split("/")[0][3:]
        ms = b["real_time"] * scale[b["time_unit"]]
        if b.get("aggregate_name") == "median":
            cpp[key] = ms
        elif b.get("run_type") == "iteration":
            single[key] = ms  # --repetitions 1: no aggregates
    cpp = cpp or single
    py = json.load(open(os.path.join(out, f"pytorch_{name}.json")))
    rows[name] = (cpp, py)

cpu = "?"
try:
    cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
except (OSError, StopIteration):
    pass
torch_version = rows["2d"][1]["torch"]
print(f"\nOne Adjoint Matching iteration (rollout, lean adjoint, regression, backward, Adam), {threads} threads,"
      f" {cpu}, {os.cpu_count()} CPUs; PyTorch {torch_version}.\n")
print("| problem | C++ ms/iter | PyTorch ms/iter | ratio (PyTorch / C++) |")
print("|---|---|---|---|")
for name, (cpp, py) in rows.items():
    c, p = cpp["Iteration"], py["iteration_ms"]
    print(f"| {names[name]} | {c:.1f} | {p:.1f} | {p / c:.2f}x |")
print("| digits model | TODO | TODO | TODO: the digits model does not exist yet (its own issue); "
      "add it here when it does |")
print("\nWhere the time goes, ms per iteration (C++: the separate Rollout and LeanAdjoint benchmarks, "
      "the rest is Iteration minus both; PyTorch: timed inside each iteration):\n")
print("| part | 2-D C++ | 2-D PyTorch | ratio | 64-D C++ | 64-D PyTorch | ratio |")
print("|---|---|---|---|---|---|---|")
parts = [("rollout (K steps, no gradients)", "Rollout", "rollout_ms"),
         ("lean adjoint (K VJPs through the base)", "LeanAdjoint", "lean_adjoint_ms"),
         ("regression, backward, Adam", None, "regression_ms"),
         ("whole iteration", "Iteration", "iteration_ms")]
for label, ck, pk in parts:
    cells = []
    for name in ("2d", "64d"):
        cpp, py = rows[name]
        c = cpp[ck] if ck else cpp["Iteration"] - cpp["Rollout"] - cpp["LeanAdjoint"]
        cells += [f"{c:.1f}", f"{py[pk]:.1f}", f"{py[pk] / c:.2f}x"]
    print(f"| {label} | " + " | ".join(cells) + " |")
print(f"\nC++: Google Benchmark, median of {reps} repetitions of at least {min_time} s each, wall time. "
      f"PyTorch: median wall time per iteration over {rows['2d'][1]['iterations_timed']} (2-D) and "
      f"{rows['64d'][1]['iterations_timed']} (64-D) iterations after 5 warm-up ones.")
EOF
