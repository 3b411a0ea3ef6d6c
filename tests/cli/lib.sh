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

# The closing line ctest's readers look for; the script's status: 0 only if nothing failed.
finish() {
  echo "$passed passed, $failed failed"
  [ "$failed" -eq 0 ]
}
