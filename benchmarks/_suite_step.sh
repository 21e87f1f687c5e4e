# Sourced by the benchmark suites: `step SECONDS NAME COMMAND...` runs COMMAND under its own time limit (a slow
# step costs only its own result), appends the last STEP_TAIL lines of its output (progress bars and blank lines
# dropped) to "$log", and prints "== NAME: rc=... wall_s=..." there and on stdout.
step() {
  local limit=$1 name=$2; shift 2
  local start; start=$(date +%s)
  echo "== $name" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | grep --line-buffered -v -E 'it/s\]$|^\s*$' | tail -"${STEP_TAIL:-60}" >> "$log"
  echo "== $name: rc=${PIPESTATUS[0]} wall_s=$(( $(date +%s) - start ))" | tee -a "$log"
}
