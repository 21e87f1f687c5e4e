#!/usr/bin/env bash
# The reference result (issue 7): configs/ref-s.yaml end to end on one GPU, artifacts to $OUT.
# On the device machine (which has no ../shared), the shared files travel in the git-ignored .carry/shared:
#   mkdir -p .carry/shared/{models,data/text,data/tasks}; cp -r ../shared/models/ref-s .carry/shared/models/
#   cp -r ../shared/data/text/{gutenberg,tinyshakespeare.txt,tinystories_sample.txt} .carry/shared/data/text/
#   cp ../shared/data/tasks/* .carry/shared/data/tasks/
#   then run `bash benchmarks/reference_ref_s.sh [key=value ...] [--until STAGE | --from STAGE]` with carry [".carry"].
# The run directory persists while the machine is warm, so a run split over two calls (--until search, then
# --from realize) resumes; the log is appended.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ -e ../shared ] || ln -sfn "$PWD/.carry/shared" ../shared
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
RUN=runs/ref-s
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader;
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'; } \
  > "$OUT/ref_s_env.txt" 2>&1
[ -f .carry/git_state.json ] && cp .carry/git_state.json "$OUT/git_state.json"  # saved by: python benchmarks/_meta.py
start=$(date +%s)
timeout "${LIMIT:-540}" python3 -m puzzle.cli run configs/ref-s.yaml run_dir=$RUN "$@" 2>&1 \
  | grep --line-buffered -v -E '^\s*$|it/s\]$' | tee -a "$OUT/ref_s_run.log"
rc=${PIPESTATUS[0]}
echo "rc=$rc wall_s=$(( $(date +%s) - start )) args: $*" | tee -a "$OUT/ref_s_run.log"
# Small artifacts only (no weights): enough to write benchmarks/results and the README table.
( cd "$RUN" && find . -name '*.json' -not -name '*.safetensors*' -size -4M -o -name '*.csv' -o -name 'report.md' \
    -o -name '*.png' | grep -v '/layer[0-9]*/' | tar czf "$OUT/ref_s_artifacts.tar.gz" -T - ) 2>/dev/null
exit "$rc"
