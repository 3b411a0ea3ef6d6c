#!/usr/bin/env bash
# Citations stay inside the repository: code comments and docs cite docs/equations.md (E1, E2, ...) and
# the papers, never the team's notes that do not ship with it. Fails when
#  - a file cites "spec section N", math.md, seed-extensions, mission-anchors or a path under ../shared,
#    or a bare section of those notes such as "(D.1)" or "A.2 item 4";
#  - a file cites an equation number En that docs/equations.md does not define, or that it defines twice;
#  - docs/equations.md names, as the code of an equation, a file that does not exist or a function that
#    file does not mention.
# Usage: citations_test.sh SOURCE_ROOT   (no build needed; ~1 s)
set -u
root=${1:?usage: citations_test.sh SOURCE_ROOT}
cd "$root" || exit 1
source tests/cli/lib.sh

self=tests/cli/citations_test.sh
doc=docs/equations.md
mapfile -t files < <(find src include apps tests bench examples scripts docs configs README.md CMakeLists.txt \
  -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.hpp' -o -name '*.py' -o -name '*.sh' -o -name '*.md' \
  -o -name '*.txt' -o -name '*.toml' -o -name '*.cmake' \) ! -path "$self" 2>/dev/null | sort)
[ ${#files[@]} -gt 100 ] && pass "found ${#files[@]} source and documentation files" || fail "found only ${#files[@]} files under $root"

# 1. Citations of material outside the repository.
outside=$(grep -nHiE 'spec section|spec sec\.|spec §|math\.md|seed-extensions|mission-anchors|\.\./shared|/work/shared|shared/(spec|reference)' \
  "${files[@]}")
[ -z "$outside" ] && pass "no citation of the notes outside the repository" || fail "citations outside the repository:
$outside"

# Bare sections of the notes: a capital A-D, a dot and a digit ("(D.1)", "A.2 item 4"), unless it is a
# paper's appendix or section ("App. D.1", "Sec. B.2").
bare=$(grep -nHE '(^|[^A-Za-z0-9.])[A-D]\.[1-9]([^0-9.]|$)' "${files[@]}" | grep -vE '(App\.|Appendix|Sec\.|Section) [A-D]\.[1-9]')
[ -z "$bare" ] && pass "no bare section of the notes" || fail "bare note sections (cite docs/equations.md instead):
$bare"

# 2. Equation numbers.
if [ -f "$doc" ]; then
  pass "$doc exists"
else
  fail "$doc is missing"
fi
defined=$(grep -oE '^### E[0-9]+\.' "$doc" 2>/dev/null | grep -oE '[0-9]+' | sort -n)
twice=$(uniq -d <<<"$defined")
[ -n "$defined" ] && [ -z "$twice" ] && pass "$(wc -l <<<"$defined") equations, each defined once" ||
  fail "equations defined twice (or none defined): ${twice:-none}"
# Lines with a linter's code ("# noqa: E731") are not citations.
undefined=""
while IFS=: read -r file line text; do
  for token in $(grep -oE '\bE[0-9]+\b' <<<"$text"); do
    grep -qx "${token#E}" <<<"$defined" || undefined+="$file:$line: $token"$'\n'
  done
done < <(grep -nHE '\bE[0-9]+\b' "${files[@]}" | grep -v 'noqa')
[ -z "$undefined" ] && pass "every cited equation number is defined in $doc" || fail "equation numbers $doc does not define:
$undefined"

# 3. The code named in docs/equations.md: each "`path: Function`" (a reference may wrap over two lines).
missing=""
while read -r ref; do
  path=${ref%%: *}
  name=${ref#*: }
  name=${name##*::}
  if [ ! -f "$path" ]; then
    missing+="$ref: no file $path"$'\n'
  elif ! grep -qF -- "$name" "$path"; then
    missing+="$ref: $path does not mention $name"$'\n'
  fi
done < <(tr '\n' ' ' <"$doc" | grep -oE '`(src|include|apps|tests)/[A-Za-z0-9_/.]+: +[A-Za-z_][A-Za-z0-9_:]*`' |
  tr -d '`' | tr -s ' ' | sort -u)
[ -z "$missing" ] && pass "every file and function $doc names exists" || fail "code named in $doc that is not there:
$missing"

echo "citations: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
