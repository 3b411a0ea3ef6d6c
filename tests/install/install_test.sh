#!/usr/bin/env bash
# The installed package as an outside project meets it: cmake --install into a temporary prefix, then
# configure, build and run tests/install (a consumer of <tilt/tilt.h>) and, if there are any
# examples/*.cpp, the examples project, each against that prefix alone. Leaves nothing behind.
#   usage: install_test.sh <source dir> <build dir>
set -euo pipefail
src=$(cd "$1" && pwd)
build=$(cd "$2" && pwd)
# Under the build directory rather than /tmp, at the same depth each run: with ccache's base_dir the
# compiler commands are the same from run to run, so the consumers' builds hit the cache.
work=$(mktemp -d "$build/install_test.XXXXXX")
trap 'rm -rf "$work"' EXIT

configure() {  # <project dir> <build dir>
  local launcher=()
  if command -v ccache >/dev/null; then launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); fi
  cmake -S "$1" -B "$2" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$work/prefix" "${launcher[@]}" >/dev/null
  cmake --build "$2" -j "${JOBS:-2}" >/dev/null
}

cmake --install "$build" --prefix "$work/prefix" >/dev/null
[ -f "$work/prefix/include/tilt/tilt.h" ] || { echo "install: include/tilt/tilt.h was not installed"; exit 1; }
for f in tiltConfig.cmake tiltConfigVersion.cmake tiltTargets.cmake; do
  [ -n "$(find "$work/prefix" -path "*/cmake/tilt/$f")" ] || { echo "install: cmake/tilt/$f was not installed"; exit 1; }
done

configure "$src/tests/install" "$work/consumer"
"$work/consumer/consumer"

shopt -s nullglob
examples=("$src"/examples/*.cpp)
if [ ${#examples[@]} -gt 0 ]; then
  configure "$src/examples" "$work/examples"
  for example in "${examples[@]}"; do
    name=$(basename "$example" .cpp)
    echo "install: running examples/$name"
    (cd "$work" && "$work/examples/$name")
  done
fi
echo "install: the installed package builds and runs outside the tree"
