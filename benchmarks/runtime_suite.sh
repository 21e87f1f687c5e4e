#!/usr/bin/env bash
# The runtime's GPU measurements, results and logs to $OUT: the GPU tests, decode attention (SDPA vs the Triton
# kernel, bf16 and FP8 caches), the GKD step rate (eager vs CUDA graph), FP8 costs on the 8B shape, and the
# large-batch decode profile. Each step has its own time limit, so a slow one costs its own result only; all five
# take up to ~13 minutes, so they run over two device calls (carry [.carry/shared, .carry/git_state.json]):
#   python benchmarks/_meta.py > .carry/git_state.json      # here, before the calls (provenance of the copy)
#   bash benchmarks/runtime_suite.sh gpu-tests decode-attention gkd-step-rate
#   bash benchmarks/runtime_suite.sh fp8-costs decode-profile
# Issue 18's remaining measurements (about 10, 6 and 10 minutes):
#   bash benchmarks/runtime_suite.sh decode-context decode-sweep fp8-costs-compiled
#   bash benchmarks/runtime_suite.sh prefill additivity-256
#   bash benchmarks/runtime_suite.sh additivity-256-deep      # batch 256 missed 3% with 4-layer neighbourhoods
#   bash benchmarks/runtime_suite.sh additivity
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ -e ../shared ] || ln -sfn "$PWD/.carry/shared" ../shared
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 PUZZLE_GIT_STATE_FILE=$PWD/.carry/git_state.json
log="$OUT/runtime_suite.log"
STEP_TAIL=40
source "$(dirname "$0")/_suite_step.sh"  # step SECONDS NAME COMMAND...
run_step() {
  case $1 in
    gpu-tests) step 150 gpu-tests python3 -m pytest -q -m gpu ;;
    decode-attention) step 200 decode-attention python3 benchmarks/decode_attention.py --out "$OUT/decode_attention.json" ;;
    gkd-step-rate) step 120 gkd-step-rate python3 benchmarks/gkd_step_rate.py --out "$OUT/gkd_step_rate.json" ;;
    fp8-costs) step 200 fp8-costs python3 benchmarks/fp8_costs.py --out "$OUT/fp8_costs.json" ;;
    decode-profile) step 150 decode-profile python3 benchmarks/decode_profile.py --variants fused --batches 64,256 \
                      --out "$OUT/decode_profile_large_batch.json" ;;
    decode-context) step 240 decode-context python3 benchmarks/decode_profile.py --variants fused,fused-triton \
                      --batches 1,64,256 --itl 64x2048,256x2048,64x8192 --profile 64x2048,256x2048 \
                      --out "$OUT/decode_profile_context.json" ;;
    decode-sweep) step 200 decode-sweep python3 benchmarks/decode_attention.py --skip-engine --sweep \
                    --out "$OUT/decode_attention_sweep.json" ;;
    fp8-costs-compiled) step 300 fp8-costs-compiled python3 benchmarks/fp8_costs.py --graphs auto \
                          --out "$OUT/fp8_costs_compiled.json" ;;
    prefill) step 200 prefill python3 benchmarks/prefill_peak.py --out "$OUT/prefill_peak.json" ;;
    additivity-256) step 300 additivity-b256 python3 benchmarks/cost_additivity.py --batch 256 \
                      --out "$OUT/cost_additivity_b256.json" ;;
    additivity-256-deep) step 400 additivity-b256-n8 python3 benchmarks/cost_additivity.py --batch 256 --neighbours 8 \
                           --out "$OUT/cost_additivity_b256_n8.json" ;;  # does a deeper neighbourhood add up at 256?
    additivity) for b in 1 64 256; do
                  step 200 "additivity-b$b" python3 benchmarks/cost_additivity.py --batch $b --out "$OUT/cost_additivity_b$b.json"
                done ;;
  esac
}
ALL="gpu-tests decode-attention gkd-step-rate fp8-costs decode-profile decode-context decode-sweep"
ALL="$ALL fp8-costs-compiled prefill additivity-256 additivity-256-deep additivity"
steps=${*:-gpu-tests decode-attention gkd-step-rate fp8-costs decode-profile}
for one in $steps; do  # every name is checked before anything runs
  case " $ALL " in *" $one "*) ;;
    *) echo "unknown step $one; steps: $ALL" >&2; exit 2 ;;
  esac
done
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; } >> "$log" 2>&1
for one in $steps; do run_step "$one"; done
