# Sourced by the study scripts (scripts/digits_conditional.sh, scripts/fashion.sh).
# timed DIR COMMAND...: runs it, then writes its wall-clock seconds to DIR/seconds.txt and its peak resident memory
# (kB, where /usr/bin/time exists) to DIR/max_rss_kb.txt.
timed() {
  local dir=$1 start rss
  shift
  start=$(date +%s)
  rss=$(mktemp)
  if [ -x /usr/bin/time ]; then /usr/bin/time -o "$rss" -f %M "$@"; else "$@"; fi
  mkdir -p "$dir"
  echo $(($(date +%s) - start)) > "$dir/seconds.txt"
  if [ -s "$rss" ]; then tail -1 "$rss" > "$dir/max_rss_kb.txt"; fi
  rm -f "$rss"
}
