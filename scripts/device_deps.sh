#!/usr/bin/env bash
# Gathers what scripts/device_check.sh needs on a GPU machine that has a CUDA PyTorch but none of Debian's
# packages and no network: the header-only libraries (nlohmann/json, toml++, CLI11) with small CMake package
# files, zlib (header and static library), GoogleTest's sources, and the digits U-Net study's base model,
# classifiers and samples (runs/digits_unet, from STUDY=unet scripts/digits_conditional.sh) when present.
# Writes DEPS (default .devdeps, which .git/info/exclude should list); carry that folder to the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
deps=${DEPS:-.devdeps}
rm -rf "$deps"
mkdir -p "$deps/include" "$deps/lib"
cp -r /usr/include/nlohmann /usr/include/toml++ /usr/include/CLI /usr/include/stb /usr/include/zlib.h /usr/include/zconf.h "$deps/include/"
cp /usr/lib/x86_64-linux-gnu/libz.a "$deps/lib/"
cp -r /usr/src/googletest "$deps/googletest"
# An INTERFACE target for each header-only package, as its own CMake package file would define it.
package() {  # name target
  mkdir -p "$deps/lib/cmake/$1"
  cat > "$deps/lib/cmake/$1/$1Config.cmake" <<EOF
# Made by scripts/device_deps.sh: the headers in ../../../include.
set($1_VERSION 99)
if(NOT TARGET $2)
  add_library($2 INTERFACE IMPORTED)
  set_target_properties($2 PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "\${CMAKE_CURRENT_LIST_DIR}/../../../include")
endif()
EOF
  printf 'set(PACKAGE_VERSION 99)\nset(PACKAGE_VERSION_COMPATIBLE TRUE)\n' > "$deps/lib/cmake/$1/$1ConfigVersion.cmake"
}
package nlohmann_json nlohmann_json::nlohmann_json
package tomlplusplus tomlplusplus::tomlplusplus
package CLI11 CLI11::CLI11
if [ -f runs/digits_unet/base/model.pt ]; then
  for f in base/model.pt base/samples_w0.csv classifier/classifier.pt unseen/classifier.pt am_lora/samples_w0.csv; do
    mkdir -p "$deps/digits_unet/$(dirname "$f")"
    cp "runs/digits_unet/$f" "$deps/digits_unet/$f"
  done
fi
du -sh "$deps"
