"""GKD (uptrain) step rate on the reference run's small model: eager vs the step as one CUDA graph.

The ref-s parent (16 layers, hidden 256, vocab 32000) distilled into a child made from it with every other
layer's attention removed, micro-batch 16 x 512 tokens, random token ids (the rate does not depend on them).
Three settings of the same `train_gkd`:
  eager_sync   cuda_graphs=off, log_every=1  (metrics read on the host after every step: one sync per step;
               the loop before deferred metrics synced twice, before and after clipping)
  eager        cuda_graphs=off, log_every=25 (no host sync between flushes)
  graphed      cuda_graphs=on,  log_every=25 (the whole step one CUDA-graph replay)
Steps/s is timed between the flush points at step 25 and the last step (every flush waits for the GPU), so
warm-up and graph capture are left out. The loss at the last step is recorded to compare the settings.

    python benchmarks/gkd_step_rate.py --out benchmarks/results/gkd_step_rate.json [--parent ../shared/models/ref-s]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import metadata

from puzzle.core.artifacts import write_json
from puzzle.core.config import from_dict
from puzzle.core.distributed import DistInfo
from puzzle.formats import load_model
from puzzle.model.decoder import PuzzleModel
from puzzle.stages.uptrain.stage import UptrainConfig, train_gkd

SETTINGS = {"eager_sync": {"cuda_graphs": "off", "log_every": 1},
            "eager": {"cuda_graphs": "off", "log_every": 25},
            "graphed": {"cuda_graphs": "on", "log_every": 25}}


def child_of(parent: PuzzleModel) -> PuzzleModel:
    """The parent with no attention in its even layers (a child the search could pick)."""
    child = copy.deepcopy(parent)
    for i in range(0, child.config.num_layers, 2):
        child.set_layer(i, None, child.layers[i].ffn)
    return child


def measure(parent: PuzzleModel, train: np.ndarray, setting: dict[str, Any], steps: int, micro: int,
            device: torch.device) -> dict[str, Any]:
    cfg = from_dict(UptrainConfig, {"steps": steps, "micro_batch_size": micro, "lr": 5e-5, "warmup_steps": 10,
                                    "val_every": 0, "checkpoint_every": 0, "device": device.type, **setting})
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    at: dict[int, float] = {}
    first = 25  # a flush point of every setting: the host has waited for the GPU there

    def stamp(step: int, record: dict[str, Any]) -> None:
        if step in (first, steps):
            at[step] = time.perf_counter()  # on_step runs after the flush that read this step from the GPU

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        result = train_gkd(child_of(parent), copy.deepcopy(parent), train, None, cfg, Path(work) / "c" / ".uptrain",
                           info, on_step=stamp)
    wall = time.perf_counter() - t0
    rate = (steps - first) / (at[steps] - at[first])
    last = result.log["train"][-1]
    out = {**setting, "steps": steps, "timed_steps": steps - first, "steps_per_s": rate,
           "ms_per_step": 1e3 / rate, "tokens_per_s": rate * micro * train.shape[1], "wall_s": wall,
           "cuda_graph_used": result.extra.get("cuda_graphs"), "last_loss": last["loss"], "last_kl": last["kl"],
           "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    print(f"{setting}: {rate:.1f} steps/s ({1e3 / rate:.1f} ms/step), {out['tokens_per_s']:.0f} tokens/s, "
          f"graph {out['cuda_graph_used']}, last loss {last['loss']:.5f}, wall {wall:.1f} s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--parent", default="../shared/models/ref-s")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    if args.steps <= 25:
        ap.error("--steps must exceed 25: steps/s is timed from the flush at step 25")
    device = torch.device(args.device)
    parent = load_model(args.parent)
    rng = np.random.default_rng(0)
    train = rng.integers(0, parent.config.vocab_size, size=(args.micro * 64, args.seq), dtype=np.int64)
    results = {}
    for name, setting in SETTINGS.items():
        if setting["cuda_graphs"] == "on" and device.type != "cuda":
            continue
        results[name] = measure(parent, train, setting, args.steps, args.micro, device)
    out = {"meta": metadata(), "benchmark": "gkd_step_rate", "parent": args.parent,
           "child": "parent with no attention in layers 0, 2, 4, ...", "micro_batch": args.micro, "seq_len": args.seq,
           "results": results}
    if "graphed" in results:
        out["graphed_speedup_over_eager_sync"] = results["graphed"]["steps_per_s"] / results["eager_sync"]["steps_per_s"]
        out["graphed_speedup_over_eager"] = results["graphed"]["steps_per_s"] / results["eager"]["steps_per_s"]
    write_json(Path(args.out), out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
