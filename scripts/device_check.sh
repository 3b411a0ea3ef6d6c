#!/usr/bin/env bash
# The GPU checks of docs/devices.md, on a machine with a CUDA PyTorch (the wheel) and none of Debian's packages:
#  1. builds tilt against the wheel's LibTorch (torch.utils.cmake_prefix_path), with the header-only dependencies,
#     zlib and GoogleTest's sources taken from $DEPS (scripts/device_deps.sh copies them from this machine);
#  2. runs the Device tests (each piece on the GPU against the same seed on the CPU);
#  3. fine-tunes the 8x8-digits U-Net with LoRA on the GPU, as `STUDY=unet scripts/digits_conditional.sh` did on the
#     CPU (its base, classifier and unseen classifier carried in $DEPS/digits_unet), samples it on the GPU and scores
#     it beside the CPU run's samples;
#  4. times training iterations on the CPU and the GPU, interleaved (tilt_device_bench);
#  5. times the same U-Net iterations in PyTorch on the GPU (bench/reference/am_reference.py), eager and compiled;
#  6. the 2-D demo fine-tuned with --device cuda and scored against exact p*.
# Every stage writes its log to $OUT and stops at the time budget (BUDGET seconds from the start), so a slow stage
# leaves the earlier results intact. Usage (on the GPU machine, from the repository root):
#   OUT=/some/dir DEPS=.devdeps BUDGET=540 scripts/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/device_check}
deps=$(realpath "${DEPS:-.devdeps}")
budget=${BUDGET:-540}
mkdir -p "$out"
start=$(date +%s)
left() { echo $((budget - ($(date +%s) - start))); }
stage() { echo "== $1 (t = $(($(date +%s) - start)) s)"; }
# Runs "$@" with at most the time left (minus a margin for the summary); false when skipped or failed.
within() {
  local t=$(($(left) - 10))
  if [ "$t" -lt 20 ]; then echo "skipped: out of time"; return 1; fi
  timeout "$t" "$@"
}
jobs=$(nproc)

stage machine
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), 'cxx11 abi', torch._C._GLIBCXX_USE_CXX11_ABI)"
  g++ --version | head -1
  cmake --version | head -1
  echo "cores $jobs"
} 2>&1 | tee "$out/machine.txt"
prefix=$(python3 -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
includes=$(python3 -c 'from torch.utils.cpp_extension import include_paths; print(" ".join("-I" + p for p in include_paths()))')

stage "googletest and the C++ standard LibTorch's headers need"
(cmake -S "$deps/googletest" -B /tmp/gtest-build -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_GMOCK=OFF \
   -DCMAKE_INSTALL_PREFIX=/tmp/gtest && cmake --build /tmp/gtest-build -j "$jobs" && cmake --install /tmp/gtest-build) \
  > "$out/gtest.log" 2>&1 &
gtest_pid=$!
std=17
echo '#include <torch/torch.h>
int main() { return at::ones({1}).item<int>() - 1; }' > /tmp/probe.cpp
if ! g++ -std=c++17 -fsyntax-only $includes /tmp/probe.cpp > "$out/probe17.log" 2>&1; then
  std=20
  echo "LibTorch's headers do not compile as C++17 (probe17.log): building as C++20"
fi
wait $gtest_pid || { echo "googletest failed to build"; tail -20 "$out/gtest.log"; }

stage "configure (C++$std)"
cmake -S . -B build-cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_STANDARD=$std \
  -DCMAKE_PREFIX_PATH="$prefix;$deps;/tmp/gtest" -DZLIB_ROOT="$deps" -DTILT_WITH_GLOO=OFF \
  -DTILT_BUILD_TESTS=ON -DTILT_BUILD_APPS=ON -DTILT_BUILD_BENCH=ON > "$out/configure.log" 2>&1 ||
  { tail -40 "$out/configure.log"; exit 1; }
grep -iE "cuda|torch" "$out/configure.log" | head -8

stage build
within cmake --build build-cuda -j "$jobs" --target tilt_device_tests tilt_cli tilt_device_bench -- -k 0 \
  > "$out/build.log" 2>&1
rc=$?
grep -E "error:|Error [0-9]|undefined reference" "$out/build.log" | head -40
[ $rc = 0 ] || { echo "build failed ($rc): $out/build.log"; tail -5 "$out/build.log"; exit 1; }

stage "device tests"
within build-cuda/tests/tilt_device_tests > "$out/device_tests.txt" 2>&1
grep -E "^\[ +(OK|FAILED|SKIPPED|PASSED) +\]|Failure|Expected|Which is|error" "$out/device_tests.txt" | head -60

tilt=build-cuda/bin/tilt
stage "digits U-Net, LoRA fine-tuning on the GPU (the CPU study's settings)"
d="$out/digits_lora"
if [ -f "$deps/digits_unet/base/model.pt" ]; then
  sets=(--set "base.path=\"$deps/digits_unet/base/model.pt\"" --set "reward.path=\"$deps/digits_unet/classifier/classifier.pt\""
        --set finetune.batch_size=32 --set finetune.num_steps=20 --set finetune.adjoint_matching.loss_early_steps=5
        --set finetune.adjoint_matching.loss_late_steps=5 --set finetune.iterations=400 --set 'finetune.model="lora"')
  s0=$(date +%s)
  within $tilt finetune -c configs/digits_unet.toml --device cuda "${sets[@]}" -o "$d" -q > "$out/digits_finetune.log" 2>&1 &&
    echo "fine-tuning: $(($(date +%s) - s0)) s for 400 iterations" | tee "$out/digits_seconds.txt"
  tail -3 "$out/digits_finetune.log"
  s0=$(date +%s)
  within $tilt sample -m "$d/model.pt" --device cuda --noise ode -n 250 --seed 1 -o "$d/samples_w0.csv" &&
    echo "sampling (2500 samples, ODE, 100 steps): $(($(date +%s) - s0)) s" | tee -a "$out/digits_seconds.txt"
  within $tilt eval-images -c configs/digits_unet.toml "${sets[@]}" --samples "$deps/digits_unet/base/samples_w0.csv" \
    --samples "$deps/digits_unet/am_lora/samples_w0.csv" --samples "$d/samples_w0.csv" \
    --unseen "$deps/digits_unet/unseen/classifier.pt" > "$out/digits_eval.txt" 2>&1
  head -12 "$out/digits_eval.txt"
else
  echo "no $deps/digits_unet/base/model.pt: skipped"
fi

stage "seconds per iteration, CPU and GPU interleaved"
within build-cuda/bench/tilt_device_bench --device cuda --repeats 3 --out "$out/device_bench.jsonl" 2> "$out/device_bench.log"

stage "U-Net iteration in PyTorch on the GPU, eager and under torch.compile (tilt's: the bench above)"
# bench/reference/am_reference.py's U-Net problems are tilt_device_bench's "U-Net 28x28 AM lora/residual, B=8 K=10"
# (the same networks, weights, reward, K and loss steps); one JSON line per run, with its median ms per iteration.
for problem in unet unet_residual; do
  for compiled in "" --compile; do
    within python3 bench/reference/am_reference.py --problem "$problem" --device cuda $compiled --warmup 5 \
      >> "$out/reference_unet.jsonl" 2>> "$out/reference_unet.log" ||
      echo "reference $problem $compiled failed: $(tail -2 "$out/reference_unet.log")"
  done
done
cat "$out/reference_unet.jsonl" 2>/dev/null

stage "2-D demo with --device cuda, against exact p*"
s0=$(date +%s)
within $tilt finetune -c configs/demo_2d.toml --device cuda --set finetune.iterations=800 -o "$out/demo" -q \
  > "$out/demo.log" 2>&1 && echo "demo fine-tuning: $(($(date +%s) - s0)) s for 800 iterations" | tee "$out/demo_seconds.txt"
within $tilt sample -m "$out/demo/model.pt" --device cuda -n 2000 -o "$out/demo/samples.csv" &&
  within $tilt eval -c configs/demo_2d.toml -s "$out/demo/samples.csv" | tee "$out/demo_eval.txt"
stage done
