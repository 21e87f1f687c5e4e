#!/usr/bin/env bash
# The SmolLM2-135M-Instruct reference (issue 14): configs/smollm2-135m-h200.yaml end to end on one GPU.
# The GGUF (98 MB) is over one device call's 64 MiB, so it travels in two parts over two consecutive calls
# (the machine stays warm 30 s between them); the run directory lives under /root so later calls resume it:
#   split -b 50M SmolLM2-135M-Instruct.Q4_1.gguf smol_part_ ; mv smol_part_aa .carry/smol1/ ; mv smol_part_ab .carry/smol2/
#   pip download --no-deps -d .carry/wheels gguf==0.19.0        # the device image has no gguf
#   call 1, carry [.carry/smol1, .carry/shared/data, .carry/wheels]:  bash benchmarks/reference_smollm2.sh --part1
#   call 2, carry [.carry/smol2, .carry/shared/data, .carry/wheels, .carry/git_state.json]:
#           bash benchmarks/reference_smollm2.sh [--until STAGE]     later calls: ... --from STAGE
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STORE=/root/smollm2; GGUF=$STORE/SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p "$STORE"
if [ "${1:-}" = "--part1" ]; then
  cp .carry/smol1/smol_part_aa "$STORE/" && echo "part 1 stored: $(du -b "$STORE/smol_part_aa")"; exit $?
fi
if [ ! -f "$GGUF" ]; then
  cat "$STORE/smol_part_aa" .carry/smol2/smol_part_ab > "$GGUF.tmp" || exit 1
  echo "$SHA  $GGUF.tmp" | sha256sum -c - || { rm -f "$GGUF.tmp"; exit 1; }
  mv "$GGUF.tmp" "$GGUF"
fi
python3 -c 'import gguf' 2>/dev/null || python3 -m pip install --no-deps --no-index -q .carry/wheels/gguf-*.whl || exit 1
source "$(dirname "$0")/_device_run.sh"
RUN=${RUN:-/root/runs/smollm2-135m-h200}
device_run "$(basename "$RUN")" configs/smollm2-135m-h200.yaml "$RUN" "$RUN.log" parent="$GGUF" "$@"
