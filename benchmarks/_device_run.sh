# Sourced by the reference scripts: `device_run NAME CONFIG RUN_DIR LOG [puzzle run args...]` runs one config
# end to end under $LIMIT seconds on the device machine and leaves in $OUT: NAME_env.txt (date, GPU, versions),
# git_state.json (saved before the call by `python benchmarks/_meta.py`), the appended log LOG (copied as
# NAME_run.log) and NAME_artifacts.tar.gz (small artifacts only: JSON, CSV, report, plots; no weights).
# Returns puzzle's exit status.
device_run() {
  local name=$1 config=$2 run=$3 log=$4; shift 4
  OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" "$(dirname "$log")"
  [ -e ../shared ] || ln -sfn "$PWD/.carry/shared" ../shared
  export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
  { date -u +%FT%TZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader;
    python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'; } \
    > "$OUT/${name}_env.txt" 2>&1
  [ -f .carry/git_state.json ] && cp .carry/git_state.json "$OUT/git_state.json"
  local start rc
  start=$(date +%s)
  timeout "${LIMIT:-540}" python3 -m puzzle.cli run "$config" run_dir="$run" "$@" 2>&1 \
    | grep --line-buffered -v -E '^\s*$|it/s\]$' | tee -a "$log"
  rc=${PIPESTATUS[0]}
  echo "rc=$rc wall_s=$(( $(date +%s) - start )) args: $*" | tee -a "$log"
  [ "$log" -ef "$OUT/${name}_run.log" ] || cp "$log" "$OUT/${name}_run.log"
  ( cd "$run" && find . -name '*.json' -not -name '*.safetensors*' -size -4M -o -name '*.csv' -o -name 'report.md' \
      -o -name '*.png' | grep -v '/layer[0-9]*/' | tar czf "$OUT/${name}_artifacts.tar.gz" -T - ) 2>/dev/null
  return "$rc"
}
