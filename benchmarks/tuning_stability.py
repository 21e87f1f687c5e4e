"""Does inductor's batch-1 GEMV tuning pick the same kernels from one compile to the next?

Compiles the runtime's fused decode regions from scratch several times (dynamo reset, inductor caches off)
under each tuning setting, and times one decode step of a small mixed model (Llama-3.1-8B-shaped layers:
two parent blocks, two GQA-2 + SwiGLU-7168, two GQA-1 + SwiGLU-3584), with every kernel's GPU time. A
setting whose step time moves between compiles makes per-block costs measured in one process miss the
throughput of another.

    python benchmarks/tuning_stability.py --out benchmarks/results/tuning_stability.json [--trials 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import metadata
from cost_additivity import measure, stack

from puzzle.core.workloads import Workload
from puzzle.model.blocks import AttentionConfig as A
from puzzle.model.blocks import BlockConfig
from puzzle.model.blocks import FFNConfig as F
from puzzle.model.presets import llama31_8b_config, tiny_llama_config
from puzzle.runtime import subblocks

SETTINGS: dict[str, dict[str, Any]] = {  # inductor settings on top of the runtime's own
    "runtime": {},  # the runtime as it is (since the Triton GEMVs: no inductor tuning at all)
    "cdt": {"coordinate_descent_tuning": True},  # what the runtime's regions used before at batch 1
    "cdt-all-directions": {"coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True},
    "cdt-all-directions-radius2": {"coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True,
                                   "coordinate_descent_search_radius": 2},
}


def fresh_compiles(settings: dict[str, Any]) -> None:
    """Forget every compiled region and tuned kernel; apply inductor settings for the next compiles."""
    import torch._inductor.codecache as cc
    import torch._inductor.config as ic

    torch._dynamo.reset()
    subblocks._COMPILED.clear()
    cc.PyCodeCache.cache_clear()
    ic.force_disable_caches = True
    ic.coordinate_descent_tuning = False
    ic.coordinate_descent_check_all_directions = False
    ic.coordinate_descent_search_radius = 1
    for k, v in settings.items():
        setattr(ic, k, v)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--settings", default="runtime")
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    parent = tiny_llama_config(num_layers=2, num_kv_heads=4, max_position_embeddings=4096) if args.tiny else llama31_8b_config()
    full = parent.blocks[0].ffn.intermediate_size
    blocks = [parent.blocks[0]] * 2 + [BlockConfig(A.gqa(max(1, parent.blocks[0].attention.num_kv_heads // 4)), F.swiglu(full // 2))] * 2
    blocks += [BlockConfig(A.gqa(1), F.swiglu(full // 4))] * 2
    w = Workload("batch1", 1, 128, 128)
    config = stack(parent, blocks, 257)
    out: dict[str, Any] = {"meta": metadata(), "benchmark": "tuning_stability", "blocks": [b.name for b in blocks],
                           "settings": {}}
    for name in args.settings.split(","):
        trials = []
        for _ in range(args.trials):
            fresh_compiles(SETTINGS[name])
            trials.append(measure(name, config, w, 256, device, dtype, repeats=15, inner=10))
        steps = [t["step_s"] for t in trials]
        out["settings"][name] = {"inductor": SETTINGS[name], "trials": trials, "step_s": steps,
                                 "max_over_min": max(steps) / min(steps), "median_step_s": statistics.median(steps)}
        print(f"{name}: steps (us) {[round(s * 1e6, 1) for s in steps]}, max/min {max(steps) / min(steps):.3f}",
              flush=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
