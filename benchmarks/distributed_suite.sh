#!/usr/bin/env bash
# Issue 20's multi-GPU measurements on one host (nvidia-h200-x2 or -x4), each 1 GPU vs N GPUs in the same call:
#   prepare          SmolLM2 run directory with import + data done (/root/runs/dist-base; the GGUF already joined
#                    under /root/smollm2 by benchmarks/reference_smollm2.sh)
#   library-smollm2  `puzzle library` on 1 GPU and under torchrun on N, entries compared, then one rank killed
#                    mid-stage and the restart checked (benchmarks/library_ranks.py)
#   library-8b       BLD of 4 Llama-3.1-8B-shape layers, 1 vs N GPUs (benchmarks/bld_throughput.py)
#   gkd-smollm2      GKD of a SmolLM2 child: 1 GPU, N-GPU DDP, N-GPU FSDP2, same global batch (gkd_ranks.py)
#   gkd-ref-s        the same on the ref-s parent (../shared/models/ref-s)
#   gkd-8b           the same on 8 layers of the Llama-3.1-8B shape (random weights)
#   tp-costs         per-variant decode costs of the 8B shape at TP 1 and N (benchmarks/tp_costs.py)
# Everything lands in $OUT/distributed.tar.gz (the device returns at most 8 files) and $OUT/distributed_suite.log.
#   python benchmarks/_meta.py > .carry/git_state.json      # here, before the call (provenance of the copy)
#   bash benchmarks/distributed_suite.sh prepare library-smollm2 library-8b gkd-smollm2 gkd-8b tp-costs
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
RES=${RES:-/root/dist_results}; mkdir -p "$RES"
[ -e ../shared ] || ln -sfn "$PWD/.carry/shared" ../shared
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 PUZZLE_GIT_STATE_FILE=$PWD/.carry/git_state.json TOKENIZERS_PARALLELISM=false
N=${NGPU:-$(nvidia-smi -L | wc -l)}
BASE=/root/runs/dist-base
GGUF=/root/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
log="$RES/distributed_suite.log"
TRUN=(python3 -m torch.distributed.run --standalone --nproc-per-node "$N")  # arrays, not functions: `timeout`
ONE=(env CUDA_VISIBLE_DEVICES=0 python3)                                    # runs programs only
source "$(dirname "$0")/_suite_step.sh"  # step SECONDS NAME COMMAND...
gkd_modes() {  # gkd_modes NAME PARENT MICRO ARGS...: one GPU (and its noise floor), then DDP and FSDP2 on N
  local name=$1 parent=$2 micro=$3; shift 3
  set -- --micro "$micro" "$@"
  step 150 "$name-1gpu" "${ONE[@]}" benchmarks/gkd_ranks.py --parent "$parent" "$@" --out "$RES/${name}_1gpu.json"
  # The floor any N-GPU run is judged against: the same run again, and the same global batch split differently
  # on one GPU (twice the micro-batch, half the accumulation), both as correct as the reference.
  step 150 "$name-1gpu-repeat" "${ONE[@]}" benchmarks/gkd_ranks.py --parent "$parent" "$@" \
    --reference "$RES/${name}_1gpu.json" --out "$RES/${name}_1gpu_repeat.json"
  step 150 "$name-1gpu-split" "${ONE[@]}" benchmarks/gkd_ranks.py --parent "$parent" "$@" --micro $((micro * 2)) \
    --reference "$RES/${name}_1gpu.json" --out "$RES/${name}_1gpu_split.json"
  for mode in ddp fsdp; do
    step 150 "$name-$mode$N" "${TRUN[@]}" benchmarks/gkd_ranks.py --parent "$parent" --parallel $mode "$@" \
      --reference "$RES/${name}_1gpu.json" --out "$RES/${name}_${mode}${N}.json"
  done
}
run_step() {
  case $1 in
    prepare) step 200 prepare python3 -m puzzle.cli run configs/smollm2-135m-h200.yaml parent="$GGUF" \
               run_dir="$BASE" --until data ;;
    library-smollm2) step 330 library-smollm2 python3 benchmarks/library_ranks.py --base "$BASE" --ranks "$N" \
                       --out "$RES/library_ranks_smollm2.json" progress=false ;;
    library-8b)
      step 150 library-8b-1gpu "${ONE[@]}" benchmarks/bld_throughput.py --models llama8b --layers-8b 4 --no-baseline \
        --out "$RES/bld_8b_1gpu.json"
      step 150 "library-8b-${N}gpu" "${TRUN[@]}" benchmarks/bld_throughput.py --models llama8b --layers-8b 4 --no-baseline \
        --reference "$RES/bld_8b_1gpu.json" --out "$RES/bld_8b_${N}gpu.json" ;;
    gkd-smollm2) gkd_modes gkd_smollm2 "$BASE/parent" 16 --global-batch 32 --seq 512 --steps 60 ;;
    gkd-ref-s) gkd_modes gkd_ref_s ../shared/models/ref-s 16 --global-batch 32 --seq 512 --steps 60 ;;
    gkd-8b) gkd_modes gkd_8b llama8b:8 2 --global-batch 8 --seq 1024 --steps 25 --log-every 5 ;;
    tp-costs) step 240 tp-costs python3 benchmarks/tp_costs.py --degrees "1,$N" --repeats 5 \
                --out "$RES/tp_costs_h200x$N.json" ;;
  esac
}
steps=${*:-prepare library-smollm2 library-8b gkd-smollm2 gkd-8b tp-costs}
for s in $steps; do  # every name is checked before anything runs
  case $s in prepare|library-smollm2|library-8b|gkd-smollm2|gkd-ref-s|gkd-8b|tp-costs) ;;
    *) echo "unknown step $s; steps: prepare library-smollm2 library-8b gkd-smollm2 gkd-ref-s gkd-8b tp-costs" >&2; exit 2 ;;
  esac
done
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch; print("torch", torch.__version__, "nccl", torch.cuda.nccl.version())'; } >> "$log" 2>&1
cp .carry/git_state.json "$RES/" 2>/dev/null
for s in $steps; do  # packed after every step: a call cut short still returns what finished
  run_step "$s"
  ( cd "$RES" && tar czf "$OUT/distributed.tar.gz" --exclude='*.safetensors' . )
  cp "$log" "$OUT/"
done
