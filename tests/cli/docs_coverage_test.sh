#!/usr/bin/env bash
# The docs cover what ships.
# 1. The configuration reference covers what the code reads: every key that src/ and apps/ read from a config
# table by name (ConfigSection's number, integer, boolean, string, choice, numbers and integers, with a literal
# key) is documented, written as code (`key`, `table.key`, `[table] key` or `key = value`), in docs/config.md
# or in the configuration table of docs/adjoint_sampling.md (the sampling commands' keys); every table they
# open (section("name")) is named there too. Fails naming the key and the file that reads it, so a new key
# does not reach users undocumented.
# 2. The README names every script in scripts/ and every config in configs/ (its scripts and configs lists).
# Usage: docs_coverage_test.sh SOURCE_ROOT   (no build needed; ~1 s)
set -u
root=${1:?usage: docs_coverage_test.sh SOURCE_ROOT}
cd "$root" || exit 1
source tests/cli/lib.sh

report=$(python3 - <<'PY'
import glob, re

files = sorted(glob.glob("src/**/*.cpp", recursive=True) + glob.glob("apps/**/*.cpp", recursive=True))
keys, tables = {}, {}
for path in files:
    text = open(path).read()
    for m in re.finditer(r'\.(number|integer|boolean|string|choice|numbers|integers)\(\s*"([A-Za-z_0-9]+)"', text):
        keys.setdefault(m.group(2), path)
    for m in re.finditer(r'\.section\(\s*"([A-Za-z_0-9]+)"', text):
        tables.setdefault(m.group(1), path)

docs = open("docs/config.md").read()
sampling = open("docs/adjoint_sampling.md").read()
start = sampling.find("\n## Configuration")
docs += sampling[start:sampling.find("\n## ", start + 1)] if start >= 0 else ""
# Code spans, and the comma-separated names of a table cell such as `energy.dim`, `wells`, `a`.
spans = set(re.findall(r"`([^`\n]+)`", docs))

def written(name):
    for s in spans:
        s = re.sub(r"^\[[A-Za-z_.]+\]\s*", "", s)       # [table] key
        s = re.split(r"\s*=", s, maxsplit=1)[0].strip()  # key = value
        if s == name or s.endswith("." + name):          # key, table.key
            return True
    return False

def table_named(name):
    return name in spans or "[" + name + "]" in docs or any(s.endswith("." + name) or s.startswith(name + ".")
                                                              for s in spans)

print("read %d keys and %d tables" % (len(keys), len(tables)))
for k, path in sorted(keys.items()):
    if not written(k):
        print("MISSING key '%s' (read in %s)" % (k, path))
for t, path in sorted(tables.items()):
    if not table_named(t):
        print("MISSING table '%s' (opened in %s)" % (t, path))
PY
)
echo "$report" | head -1
counts=$(echo "$report" | head -1 | grep -oE '[0-9]+' | head -1)
[ "${counts:-0}" -gt 100 ] && pass "found the keys the code reads" || fail "found too few keys: $report"
missing=$(echo "$report" | grep '^MISSING')
[ -z "$missing" ] && pass "every key and table the code reads is in the configuration reference" || fail \
  "not in docs/config.md (nor docs/adjoint_sampling.md's configuration table):
$missing"

unnamed=""
for f in scripts/* configs/*; do
  [ -f "$f" ] || continue
  grep -qF "$(basename "$f")" README.md || unnamed+=" $f"
done
[ -z "$unnamed" ] && pass "README names every script and config" || fail "README does not name:$unnamed"

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
