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
source "$(dirname "$0")/_device_run.sh"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
device_run ref_s configs/ref-s.yaml runs/ref-s "$OUT/ref_s_run.log" "$@"
