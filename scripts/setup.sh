#!/usr/bin/env bash
# Installs what tilt needs from Debian (bookworm) packages, if missing. Idempotent.
set -euo pipefail

packages=(
  cmake g++ ccache
  libtorch-dev            # LibTorch 1.13 (CPU)
  libopenblas0-openmp     # without it matrix work is ~20x slower; the OpenMP build follows torch's thread count
  libcli11-dev nlohmann-json3-dev libtomlplusplus-dev libstb-dev
  zlib1g-dev              # reads data/digits/digits.csv.gz and the Fashion-MNIST idx files
  dataset-fashion-mnist   # Fashion-MNIST in /usr/share/datasets/fashion-mnist ([data] type = "fashion_mnist")
  libgtest-dev libbenchmark-dev
  libgloo-dev             # headers of torch's c10d Gloo backend (distributed training; libtorch has the code)
  python3                 # the CLI tests parse `tilt eval --json`
  python3-torch           # PyTorch 1.13 for /usr/bin/python3: the TorchScript round trip, ctest reference_methods (~17 s)
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The pthread OpenBLAS ignores torch's thread count and wins the alternatives by priority if it is
# installed; make sure the OpenMP build is the one in use.
arch_dir=/usr/lib/x86_64-linux-gnu
if [ -d "$arch_dir/openblas-openmp" ] && [ -d "$arch_dir/openblas-pthread" ]; then
  for lib in libblas.so.3 liblapack.so.3 libopenblas.so.0; do
    $SUDO update-alternatives --set "$lib-x86_64-linux-gnu" "$arch_dir/openblas-openmp/$lib" >/dev/null
  done
fi
echo "setup: dependencies present"
