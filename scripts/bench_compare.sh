#!/usr/bin/env bash
# The C++ Adjoint Matching iteration against its PyTorch reference (issue 5), in one go: builds the
# benchmarks if needed (as scripts/bench.sh does), then for each problem runs the C++ iteration
# (build/bench/tilt_bench: BM_Iteration/P/T, BM_PeakGemm) and the PyTorch reference
# (bench/reference/am_reference.py: the same iteration, networks, batch, K, loss steps, Adam) on the
# same number of threads, and prints Markdown tables: ms per iteration and the ratios (tilt's default
# taped path; the same with ATen's matrix products, TILT_GEMM=aten, the reference's OpenBLAS; and its
# autograd path, which computes the iteration the way the reference does), where
# the time goes, the matrix work's share of the machine's measured peak, and peak memory. Raw results
# go to build/bench_compare/. Run nothing else meanwhile: two OpenMP jobs on the same cores slow each
# other down by up to 10x.
#
#   scripts/bench_compare.sh [--threads N] [--repetitions R] [--min-time S] [--check] [--no-build]
#
#   --threads N      torch threads on both sides (default 2, or TILT_THREADS)
#   --repetitions R  C++: Google Benchmark repetitions, the one of median time is reported (default 5)
#   --min-time S     C++: seconds per repetition (default 1); PyTorch: times R * S seconds of iterations
#   --check          first run the reference's correctness checks, against this C++ build too (~2-5 min)
#   --no-build       use the existing build/bench/tilt_bench
#   --unet           the U-Net rows only (skips the MLP problems)
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
mlp=1
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads=$2; shift 2 ;;
    --repetitions) reps=$2; shift 2 ;;
    --min-time) min_time=$2; shift 2 ;;
    --check) check=1; shift ;;
    --no-build) build=0; shift ;;
    --unet) mlp=0; shift ;;
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
if [ "$mlp" = 1 ]; then
echo "bench_compare: matrix-multiply peak, C++ ($threads threads)" >&2
TILT_THREADS=$threads "$bench" --benchmark_filter='^BM_PeakGemm' --benchmark_min_time="$min_time" \
  --benchmark_repetitions="$reps" --benchmark_report_aggregates_only=false --benchmark_format=json > "$out/cpp_peak.json"
for p in 0 1 2; do
  name=$(echo "2d 64d digits" | cut -d' ' -f$((p + 1)))
  echo "bench_compare: $name, C++ ($threads threads)" >&2
  TILT_THREADS=$threads "$bench" --benchmark_filter="^BM_Iteration/$p/" \
    --benchmark_min_time="$min_time" --benchmark_repetitions="$reps" --benchmark_report_aggregates_only=false \
    --benchmark_format=json > "$out/cpp_$name.json"
  echo "bench_compare: $name, C++ taped path with ATen's products (TILT_GEMM=aten)" >&2
  TILT_GEMM=aten TILT_THREADS=$threads "$bench" --benchmark_filter="^BM_Iteration/$p/1/" \
    --benchmark_min_time="$min_time" --benchmark_repetitions="$reps" --benchmark_report_aggregates_only=false \
    --benchmark_format=json > "$out/cpp_${name}_aten.json"
  echo "bench_compare: $name, PyTorch $torch_version ($threads threads)" >&2
  "$python" "$reference" --problem "$name" --threads "$threads" --min-time "$py_time" > "$out/pytorch_$name.json"
done
# The iterations that avoid or share Adjoint Matching's rollout and backward sweep (issue 23): RAM, EAM and the
# buffers, on the 2-D demo and the digits model (the same model, reward, batch and K as above).
for p in 0 2; do
  name=$(echo "2d 64d digits" | cut -d' ' -f$((p + 1)))
  echo "bench_compare: $name, RAM, EAM and buffers, C++ ($threads threads)" >&2
  TILT_THREADS=$threads "$bench" --benchmark_filter="^BM_(Ram|Eam|Buffered)Iteration/$p(/|\$)" \
    --benchmark_min_time="$min_time" --benchmark_repetitions="$reps" --benchmark_report_aggregates_only=false \
    --benchmark_format=json > "$out/cpp_noised_$name.json"
  for m in ram eam eam_w buf buf_w; do
    echo "bench_compare: $name, $m, PyTorch $torch_version ($threads threads)" >&2
    "$python" "$reference" --problem "$name" --method "$m" --threads "$threads" --min-time "$py_time" \
      > "$out/pytorch_${m}_$name.json"
  done
done

fi

# The 28x28 U-Net with LoRA (rank 4; B = 8, K = 10; issue 20): Adjoint Matching, RAM and EAM on the autograd path.
echo "bench_compare: U-Net, C++ ($threads threads)" >&2
TILT_THREADS=$threads "$bench" --benchmark_filter='^BM_UNetIteration/(0|2)/8/10|^BM_(Ram|Eam)Iteration/3(/0)?/' \
  --benchmark_repetitions="$reps" --benchmark_report_aggregates_only=false --benchmark_format=json > "$out/cpp_unet.json"
for m in am ram eam; do
  echo "bench_compare: U-Net, $m, PyTorch $torch_version ($threads threads)" >&2
  "$python" "$reference" --problem unet --method "$m" --threads "$threads" --min-time "$py_time" --warmup 2 \
    --min-iters 3 > "$out/pytorch_${m}_unet.json"
done
echo "bench_compare: U-Net, residual mode, am, PyTorch $torch_version ($threads threads)" >&2
"$python" "$reference" --problem unet_residual --method am --threads "$threads" --min-time "$py_time" --warmup 2 \
  --min-iters 3 > "$out/pytorch_am_unet_residual.json"
# Adjoint Matching's U-Net iteration again with the memory setting swapped: tilt with glibc's malloc as the system
# sets it (TILT_MALLOC=system), PyTorch with tilt's setting (keep_cpu_memory) through glibc's environment variables.
echo "bench_compare: U-Net, Adjoint Matching, the malloc settings swapped" >&2
TILT_MALLOC=system TILT_THREADS=$threads "$bench" --benchmark_filter='^BM_UNetIteration/2/8/10' \
  --benchmark_repetitions="$reps" --benchmark_report_aggregates_only=false --benchmark_format=json \
  > "$out/cpp_unet_system_malloc.json"
MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=-1 "$python" "$reference" --problem unet --method am \
  --threads "$threads" --min-time "$py_time" --warmup 2 --min-iters 3 > "$out/pytorch_am_unet_kept_memory.json"

"$python" - "$out" "$threads" "$reps" "$min_time" "$mlp" <<'EOF'
import json, os, sys

out, threads, reps, min_time, mlp = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "1"
names = {"2d": "2-D demo: exact 8-Gaussian base, residual MLP 3x128, K = 60, batch 256",
         "64d": "64-D: MLP base 3x256, residual MLP 3x256, K = 40, batch 256",
         "digits": "digits model: MLP base 3x256, residual MLP 2x256, classifier reward, K = 40, batch 64"}
scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}


def load(path):
    """{run name: benchmark} from Google Benchmark's JSON: of each benchmark's repetitions, the one with the
    median wall time, so that its counters (the phases) add up to its time."""
    runs = {}
    for b in json.load(open(path))["benchmarks"]:
        if b.get("run_type") == "iteration":
            runs.setdefault(b["run_name"], []).append(b)
    return {k: sorted(v, key=lambda b: b["real_time"])[(len(v) - 1) // 2] for k, v in runs.items()}


def ms(b):
    return b["real_time"] * scale[b["time_unit"]]


def mlp_report():
    """The tables of the MLP problems."""
    peak = {k: v["GFLOP/s"] for k, v in load(os.path.join(out, "cpp_peak.json")).items()}
    gemm = json.load(open(os.path.join(out, "cpp_peak.json")))["context"].get("tilt_gemm", "ATen")
    # The machine's peak: the faster of ATen's and tilt's products on a 2048^3 product.
    peak_big = max(peak["BM_PeakGemm/2048/2048/0/real_time"], peak["BM_PeakGemm/2048/2048/1/real_time"])
    rows, aten = {}, {}
    for name, p in (("2d", 0), ("64d", 1), ("digits", 2)):
        cpp = load(os.path.join(out, f"cpp_{name}.json"))
        rows[name] = (cpp[f"BM_Iteration/{p}/1/real_time"], cpp[f"BM_Iteration/{p}/0/real_time"],
                      json.load(open(os.path.join(out, f"pytorch_{name}.json"))))
        aten[name] = load(os.path.join(out, f"cpp_{name}_aten.json"))[f"BM_Iteration/{p}/1/real_time"]

    cpu = "?"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    torch_version = rows["2d"][2]["torch"]
    print(f"\nOne Adjoint Matching iteration (rollout, lean adjoint, regression, backward, Adam), {threads} threads,"
          f" {cpu}, {os.cpu_count()} CPUs; PyTorch {torch_version}. tilt's default (taped) path runs each network"
          f" once per state and computes the VJPs and gradients from the recorded activations, its matrix products"
          f" with {gemm} (TILT_GEMM=aten: ATen's, the reference's OpenBLAS); its autograd path computes the iteration"
          f" the way the reference does.\n")
    print("| problem | tilt ms/iter | PyTorch ms/iter | ratio (PyTorch / tilt) | tilt, ATen products | ratio |"
          " tilt autograd path ms/iter | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (taped, auto, py) in rows.items():
        t, a, p, ta = ms(taped), ms(auto), py["iteration_ms"], ms(aten[name])
        print(f"| {names[name]} | {t:.1f} | {p:.1f} | **{p / t:.2f}x** | {ta:.1f} | {p / ta:.2f}x | {a:.1f} | {p / a:.2f}x |")

    print("\nWhere the time goes, ms per iteration (tilt, taped path: timed inside compute(), its regression"
          " includes the hand-written gradients, 'backward, Adam' is the rest of the iteration; PyTorch: timed"
          " inside each iteration, its regression includes backward and Adam):\n")
    print("| part | " + " | ".join(f"{n} tilt | {n} PyTorch" for n in rows) + " |")
    print("|---|" + "---|---|" * len(rows))
    parts = [("rollout (K steps, no gradients)", "rollout_ms", "rollout_ms"),
             ("lean adjoint (K VJPs through the base)", "adjoint_ms", "lean_adjoint_ms"),
             ("regression (and gradients)", "regression_ms", "regression_ms"),
             ("backward, Adam", None, None),
             ("whole iteration", "iteration", "iteration_ms")]
    for label, ck, pk in parts:
        cells = []
        for name, (taped, auto, py) in rows.items():
            whole = ms(taped)
            if ck == "iteration":
                c = whole
            elif ck:
                c = taped[ck]
            else:
                c = whole - taped["rollout_ms"] - taped["adjoint_ms"] - taped["regression_ms"]
            cells += [f"{c:.1f}", f"{py[pk]:.1f}" if pk else "(above)"]
        print(f"| {label} | " + " | ".join(cells) + " |")

    print(f"\nMatrix work and memory (tilt). Measured float32 matrix-multiply peak: {peak_big:.0f} GFLOP/s"
          f" (2048^3; ATen {peak['BM_PeakGemm/2048/2048/0/real_time']:.0f}, {gemm}"
          f" {peak['BM_PeakGemm/2048/2048/1/real_time']:.0f}); for 256 x 256 by 256 x 256, the iteration's typical"
          f" product: ATen {peak['BM_PeakGemm/256/256/0/real_time']:.0f}, {gemm} {peak['BM_PeakGemm/256/256/1/real_time']:.0f}"
          f" GFLOP/s. GFLOP: the matrix products each path performs (the taped path does fewer). Peak"
          f" memory: the most live tensor storage during an iteration above what was live before the first one (it includes the tapes kept between iterations).\n")
    print("| problem | path | GFLOP per iteration | GFLOP/s | share of peak | peak memory (MB) |")
    print("|---|---|---|---|---|---|")
    for name, (taped, auto, py) in rows.items():
        for path, b in (("taped", taped), ("autograd", auto)):
            gflops = b["GFLOP/s"]
            print(f"| {name} | {path} | {b['GFLOP']:.2f} | {gflops:.0f} | {100 * gflops / peak_big:.0f}% |"
                  f" {b['peak_MB']:.0f} |")
    print("\nThe iterations of issue 23 (tilt's docs/equations.md): RAM (E128) and EAM (E132) draw B endpoints from the"
          " model's K-step ODE (EAM weighted: its memoryless SDE, with path weights) and regress on 4 B noisings of them,"
          " with no lean adjoint; a buffer (E126-E127) simulates 4 B trajectories and their lean adjoints once per 16"
          " iterations (4 passes) and regresses on B of them per iteration, with or without the weights of the paths"
          " after t_k (time per iteration: over whole cycles). The same model, reward, batch and K as the rows above"
          " (tilt: BM_RamIteration, BM_EamIteration, BM_BufferedIteration; the reference: am_reference.py --method, the"
          " same iterations, checked against tilt's Trainer number by number with --check). Last column: the"
          " iteration's time over tilt's Adjoint Matching iteration (taped).\n")
    print("| problem | method | tilt ms/iter | PyTorch ms/iter | ratio (PyTorch / tilt) | tilt peak memory (MB) |"
          " tilt, time over its AM iteration |")
    print("|---|---|---|---|---|---|---|")
    labels = {"ram": ("RAM (critic 2x64)", "BM_RamIteration/{p}/real_time"),
              "eam": ("EAM, ODE endpoints", "BM_EamIteration/{p}/0/real_time"),
              "eam_w": ("EAM, weighted SDE endpoints", "BM_EamIteration/{p}/1/real_time"),
              "buf": ("buffer, unweighted", "BM_BufferedIteration/{p}/0/real_time"),
              "buf_w": ("buffer, weighted (future)", "BM_BufferedIteration/{p}/1/real_time")}
    for name, p in (("2d", 0), ("digits", 2)):
        cpp = load(os.path.join(out, f"cpp_noised_{name}.json"))
        for method, (label, key) in labels.items():
            b = cpp[key.format(p=p)]
            py = json.load(open(os.path.join(out, f"pytorch_{method}_{name}.json")))
            t, q = b.get("ms_per_iteration", ms(b)), py["iteration_ms"]
            print(f"| {name} | {label} | {t:.1f} | {q:.1f} | **{q / t:.2f}x** | {b['peak_MB']:.0f} |"
                  f" {t / ms(rows[name][0]):.2f} |")

if mlp:
    mlp_report()
print("\nThe 28x28 U-Net (E124: 32 x (1, 2, 2) channels, 2 blocks per level, untrained) with LoRA adapters of rank 4,"
      " B = 8, K = 10, a quadratic reward; both sides on autograd (a U-Net has no taped path), 3 iterations per C++"
      " repetition. The reference's U-Net draws the same weights and adapters and is checked against tilt's Trainer"
      " number by number (--check).\n")
print("| iteration | tilt ms/iter | PyTorch ms/iter | ratio (PyTorch / tilt) | tilt peak memory (MB) |")
print("|---|---|---|---|---|")
cpp = load(os.path.join(out, "cpp_unet.json"))
for method, label, key in (("am", "Adjoint Matching", "BM_UNetIteration/2/8/10/iterations:3/real_time"),
                           ("ram", "RAM", "BM_RamIteration/3/iterations:3/real_time"),
                           ("eam", "EAM, ODE endpoints", "BM_EamIteration/3/0/iterations:3/real_time")):
    b = cpp[key]
    py = json.load(open(os.path.join(out, f"pytorch_{method}_unet.json")))
    t, q = ms(b), py["iteration_ms"]
    print(f"| {label} | {t:.0f} | {q:.0f} | **{q / t:.2f}x** | {b['peak_MB']:.0f} |")
b = cpp["BM_UNetIteration/0/8/10/iterations:3/real_time"]
q = json.load(open(os.path.join(out, "pytorch_am_unet_residual.json")))["iteration_ms"]
print(f"| Adjoint Matching, residual U-Net (timing only; tilt keeps the base's graphs) | {ms(b):.0f} | {q:.0f} |"
      f" **{q / ms(b):.2f}x** | {b['peak_MB']:.0f} |")
key = "BM_UNetIteration/2/8/10/iterations:3/real_time"
t_kept, t_system = ms(cpp[key]), ms(load(os.path.join(out, "cpp_unet_system_malloc.json"))[key])
q_system = json.load(open(os.path.join(out, "pytorch_am_unet.json")))["iteration_ms"]
q_kept = json.load(open(os.path.join(out, "pytorch_am_unet_kept_memory.json")))["iteration_ms"]
print("\nAdjoint Matching's iteration with each malloc setting: tilt keeps freed memory by default (keep_cpu_memory;"
      " TILT_MALLOC=system: not), PyTorch not (given the same setting through MALLOC_MMAP_THRESHOLD_ and"
      " MALLOC_TRIM_THRESHOLD_).\n")
print("| malloc | tilt ms/iter | PyTorch ms/iter | ratio (PyTorch / tilt) |")
print("|---|---|---|---|")
print(f"| each side's default (tilt keeps memory, PyTorch not) | {t_kept:.0f} | {q_system:.0f} | **{q_system / t_kept:.2f}x** |")
print(f"| both keep freed memory | {t_kept:.0f} | {q_kept:.0f} | {q_kept / t_kept:.2f}x |")
print(f"| neither (the system's malloc) | {t_system:.0f} | {q_system:.0f} | {q_system / t_system:.2f}x |")
print(f"\nC++: Google Benchmark, the repetition of median time of {reps} of at least {min_time} s each, wall time. "
      f"PyTorch: median wall time per iteration over at least {reps} x {min_time} s after 5 warm-up iterations (the"
      f" U-Net: 2; the buffers: the mean over whole refill cycles).")
EOF
