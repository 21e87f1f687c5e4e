"""Is a batch-1 decode step bound by the GPU or by the host launching its CUDA graph?

For the reference run's 16-layer model and for Llama-3.1-8B's shape (random weights, bf16, 128 cached
tokens): the decode step's time when replayed back to back (CUDA events), the host's time per
`Engine.decode` call while the GPU is kept busy (no synchronisation), the host's time for the bare
`CUDAGraph.replay()`, and the step's kernel count. When the host's time per call reaches the step's time,
the GPU waits for the host, and per-block GPU times cannot add up to the step.

    python benchmarks/graph_launch.py --out benchmarks/results/graph_launch.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import metadata
from cost_additivity import kernel_profile
from cost_model_ref_s import ref_s_config

from puzzle.model.decoder import build_model
from puzzle.model.presets import llama31_8b_config
from puzzle.runtime.engine import Engine
from puzzle.runtime.timing import sync, time_calls


def host_seconds(fn: Any, n: int, device: torch.device) -> float:
    """Host wall time per call of `fn` over n calls issued without waiting for the GPU (median of 5 runs)."""
    runs = []
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n)
        sync(device)
    return statistics.median(runs)


@torch.inference_mode()
def measure(name: str, config: Any, device: torch.device) -> dict[str, Any]:
    model = build_model(config, device=device, dtype=torch.bfloat16, seed=0).eval()
    engine = Engine(model, 1, 256)
    engine.prefill(torch.randint(0, config.vocab_size, (1, 128), device=device))
    step = engine.decode_at(129, torch.randint(0, config.vocab_size, (1,), device=device))
    step()  # captures the graph
    graph = next(iter(engine._graphs.values()))
    gpu = statistics.median(time_calls(step, device, repeats=20, warmup=5, inner=20))
    out = {"gpu_step_s": gpu, "host_decode_call_s": host_seconds(step, 50, device),
           "host_replay_s": host_seconds(graph.replay, 50, device), **kernel_profile(step, device)}
    out.pop("kernels", None)
    out["host_over_gpu"] = out["host_decode_call_s"] / gpu
    print(f"{name}: gpu step {gpu * 1e6:.1f} us, host per decode() {out['host_decode_call_s'] * 1e6:.1f} us, "
          f"per replay() {out['host_replay_s'] * 1e6:.1f} us, kernels {out.get('kernel_calls')}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    device = torch.device("cuda")
    out = {"meta": metadata(), "benchmark": "graph_launch",
           "models": {"ref-s": measure("ref-s", ref_s_config(None), device),
                      "llama-3.1-8b": measure("llama-3.1-8b", llama31_8b_config(), device)}}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
