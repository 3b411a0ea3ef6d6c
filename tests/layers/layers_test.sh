#!/usr/bin/env bash
# The library's layering, checked on the sources: every #include of a tilt header in include/ and src/
# must name the file's own layer or one below it, in the order given (lowest first, as in
# src/CMakeLists.txt). The build enforces the same rule (each layer sees only the include roots of the
# layers it links); this check is cheap and names each violation with its file and line. It also
# checks that include/ and src/ hold no directory outside the layers, and that <tilt/tilt.h> includes
# every public header.
#   usage: layers_test.sh <source dir> <layer>...
set -uo pipefail
src=$1
shift
declare -A rank
i=0
for layer in "$@"; do rank[$layer]=$i; i=$((i + 1)); done
top=$i  # tilt/tilt.h: above every layer
failures=0
fail() { echo "$1"; failures=$((failures + 1)); }

for dir in "$src"/include/tilt/*/ "$src"/src/*/; do
  name=$(basename "$dir")
  [ -n "${rank[$name]+x}" ] || fail "${dir#"$src"/}: not a layer (known: $*)"
done

# file:line:text of every include naming a tilt header: "tilt/<layer>/..." or, between private headers
# of src/, "../<layer>/...".
while IFS= read -r hit; do
  file=${hit%%:*}
  rest=${hit#*:}
  line=${rest%%:*}
  text=${rest#*:}
  rel=${file#"$src"/}
  case $rel in
    include/tilt/tilt.h) own=tilt; own_rank=$top ;;
    include/tilt/*/*) own=${rel#include/tilt/}; own=${own%%/*}; own_rank=${rank[$own]:-} ;;
    src/*/*) own=${rel#src/}; own=${own%%/*}; own_rank=${rank[$own]:-} ;;
    *) continue ;;
  esac
  [ -n "$own_rank" ] || continue  # reported above as not a layer
  target=$(sed -E 's@^[[:space:]]*#[[:space:]]*include[[:space:]]*["<](tilt/|\.\./)([^/">]+)/.*@\2@' <<<"$text")
  if [ -z "${rank[$target]+x}" ]; then
    fail "$rel:$line: includes a header of '$target', which is not a layer: $text"
  elif [ "${rank[$target]}" -gt "$own_rank" ]; then
    fail "$rel:$line: layer '$own' includes '$target', a layer above it: $text"
  fi
done < <(grep -rnE '^[[:space:]]*#[[:space:]]*include[[:space:]]*["<](tilt/|\.\./)[^/">]+/' \
           --include='*.h' --include='*.cpp' "$src/include" "$src/src")

umbrella="$src/include/tilt/tilt.h"
[ -f "$umbrella" ] || { fail "include/tilt/tilt.h: missing"; umbrella=/dev/null; }
for header in "$src"/include/tilt/*/*.h; do
  name=${header#"$src"/include/}
  grep -q "^#include \"$name\"" "$umbrella" || fail "include/tilt/tilt.h: does not include $name"
done

if [ "$failures" -gt 0 ]; then
  echo "layers: $failures violation(s); the layers, lowest first: $*"
  exit 1
fi
echo "layers: every include follows $*"
