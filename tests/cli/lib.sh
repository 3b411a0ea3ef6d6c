# Shared by the CLI test scripts (sourced): counters, and checks of a command's exit status and message.
passed=0
failed=0

pass() { echo "ok   $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1"; failed=$((failed + 1)); }
skip() { echo "skip $1"; }

# expect_error NAME "text the message must contain" command...
# The command must exit with status 1 within 60 s and print "tilt: error: ... text ...".
expect_error() {
  local name=$1 text=$2; shift 2
  local out
  out=$(timeout 60 "$@" 2>&1); local rc=$?
  if [ $rc -eq 1 ] && grep -qF -- "tilt: error:" <<<"$out" && grep -qF -- "$text" <<<"$out"; then
    pass "$name"
  else
    fail "$name (rc=$rc): ${out:0:400}"
  fi
}

# expect_absent NAME PATH...: a failed command left none of these behind.
expect_absent() {
  local name=$1; shift
  local p
  for p in "$@"; do
    if [ -e "$p" ]; then fail "$name: $p was written"; return; fi
  done
  pass "$name"
}

# tiny_config SEED THREADS: the head of the configs the CLI tests run, a tiny version of the 2-D demo (a ring
# of 4 Gaussians, its exact velocity, a quadratic reward); the caller appends its own tables.
tiny_config() {
  printf 'seed = %s\nthreads = %s\n' "$1" "$2"
  cat <<'TOML'
[data]
type = "ring"
components = 4
radius = 2.0
std = 0.5
[base]
type = "exact"
[reward]
type = "quadratic"
center = [2.0, 0.0]
precision = 0.5
TOML
}

# The closing line ctest's readers look for; the script's status: 0 only if nothing failed.
finish() {
  echo "$passed passed, $failed failed"
  [ "$failed" -eq 0 ]
}
