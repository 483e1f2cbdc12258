# Sourced by the scripts: `with_progress WHAT CMD...` runs CMD and, while it runs, prints
# a line every 20 s saying what is running and for how long (a first build or the torch
# download runs for minutes without a word of its own).
with_progress() {
  local what="$1"
  shift
  local t0
  t0=$(date +%s)
  (
    trap 'exit 0' TERM
    while sleep 20; do
      echo "  ... $what: $(($(date +%s) - t0)) s so far" >&2
    done
  ) &
  local ticker=$!
  local rc=0
  "$@" || rc=$?
  kill "$ticker" 2>/dev/null || true
  wait "$ticker" 2>/dev/null || true
  if [ "$rc" -eq 0 ] && [ $(($(date +%s) - t0)) -ge 20 ]; then
    echo "  ... $what: done in $(($(date +%s) - t0)) s" >&2
  fi
  return "$rc"
}
