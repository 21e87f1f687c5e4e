"""GKD (uptrain) on one GPU and across N GPUs (torchrun: DDP or FSDP2), same global batch, side by side.

Every mode trains the same child from the same parent on the same global batches: the per-GPU micro-batch is
fixed (`--micro`), so one GPU accumulates `global / micro` micro-batches per step and N ranks accumulate
`global / (micro * N)` each; the kernels see the same shapes and only the gradient reduction differs.
Records the loss trajectory (compared with `--reference`, the one-GPU file), steps/s and tokens/s timed
between the flush after step `--log-every` and the last step (warm-up and compilation left out), tokens/s
per GPU, and every rank's wall time and peak memory (`train_gkd`'s `ranks`).

Parents: a model directory (e.g. an imported run's `parent/`), or `llama8b:LAYERS` for the Llama-3.1-8B shape
cut to LAYERS layers with random weights (whole 8B GKD needs ~130 GB for the fp32 student and AdamW alone).
The child is the parent without attention in its even layers.

    CUDA_VISIBLE_DEVICES=0 python benchmarks/gkd_ranks.py --parent RUN/parent --out gkd_1.json
    torchrun --standalone --nproc-per-node 2 benchmarks/gkd_ranks.py --parent RUN/parent --parallel fsdp \\
        --reference gkd_1.json --out gkd_fsdp2.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import metadata
from gkd_step_rate import child_of

from puzzle.core.artifacts import write_json
from puzzle.core.config import from_dict
from puzzle.core.distributed import all_gather_objects, distributed, finish_process
from puzzle.formats import load_model
from puzzle.model.blocks import uniform_blocks
from puzzle.model.decoder import PuzzleModel, build_model
from puzzle.model.presets import llama31_8b_config, tiny_llama_config
from puzzle.stages.uptrain.stage import UptrainConfig, train_gkd

TRAJECTORY_KEYS = ("loss", "kl", "cosine")


def make_parent(spec: str, device: torch.device) -> PuzzleModel:
    if spec.startswith("llama8b:"):
        cfg = replace(llama31_8b_config(), blocks=uniform_blocks(int(spec.split(":", 1)[1]), 8, 14336))
        return build_model(cfg, device=device, dtype=torch.float32, seed=0)
    if spec == "tiny":
        return build_model(tiny_llama_config(num_layers=2), seed=0)
    return load_model(spec)


def compare(mine: list[dict[str, Any]], reference: list[dict[str, Any]]) -> dict[str, Any]:
    """Largest relative difference per trajectory term over the steps both runs logged."""
    ref = {r["step"]: r for r in reference}
    steps = [r for r in mine if r["step"] in ref]
    out: dict[str, Any] = {"steps_compared": len(steps)}
    for key in TRAJECTORY_KEYS:
        rel = [abs(r[key] - ref[r["step"]][key]) / max(abs(ref[r["step"]][key]), 1e-12) for r in steps]
        out[f"{key}_max_rel_diff"] = max(rel, default=None)
        out[f"{key}_last_rel_diff"] = rel[-1] if rel else None
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parent", required=True, help="model directory, llama8b:LAYERS, or tiny (CPU smoke test)")
    ap.add_argument("--parallel", default="none", choices=["none", "ddp", "fsdp"])
    ap.add_argument("--global-batch", type=int, default=32, help="sequences per optimizer step, all GPUs together")
    ap.add_argument("--micro", type=int, default=16, help="sequences per micro-batch on each GPU")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--log-every", type=int, default=10, help="flush interval; timing starts at the first flush")
    ap.add_argument("--cuda-graphs", default="off", choices=["auto", "on", "off"])
    ap.add_argument("--reference", type=Path, default=None, help="a one-GPU result to compare the trajectory with")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and args.parent != "tiny"
    with distributed("cuda" if cuda else "cpu") as info:
        per_step = args.micro * info.world_size
        if args.global_batch % per_step or args.steps <= args.log_every:
            ap.error(f"--global-batch must be a multiple of micro x ranks ({per_step}); --steps > --log-every")
        parent = make_parent(args.parent, info.device)
        rng = np.random.default_rng(0)  # the rate and the parity do not depend on the token values
        train = rng.integers(0, parent.config.vocab_size, size=(args.global_batch * 8, args.seq), dtype=np.int64)
        cfg = from_dict(UptrainConfig, {
            "steps": args.steps, "micro_batch_size": args.micro, "grad_accum": args.global_batch // per_step,
            "lr": 5e-5, "warmup_steps": 5, "val_every": 0, "checkpoint_every": 0, "log_every": args.log_every,
            "parallel": args.parallel, "cuda_graphs": args.cuda_graphs, "device": info.device.type,
            "fsdp_min_params": 0})
        at: dict[int, float] = {}

        def stamp(step: int, record: dict[str, Any]) -> None:
            if step in (args.log_every, args.steps):
                at[step] = time.perf_counter()  # after the flush that read this step from the GPU

        child = child_of(parent)
        start = time.perf_counter()
        # every rank needs the same work directory: rank 0's temporary name goes through the process group
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(str(all_gather_objects(tmp)[0])) / "child" / ".uptrain"
            result = train_gkd(child, parent.to(info.device), train, None, cfg, work, info, on_step=stamp)
        wall = time.perf_counter() - start
        if not info.is_main:
            return 0
        timed = args.steps - args.log_every
        rate = timed / (at[args.steps] - at[args.log_every])
        tokens = rate * args.global_batch * args.seq
        out: dict[str, Any] = {
            "meta": metadata(), "benchmark": "gkd_ranks", "parent": args.parent,
            "child": "parent with no attention in layers 0, 2, 4, ...",
            "parameters": sum(p.numel() for p in child.parameters()), "world_size": info.world_size,
            "parallel": args.parallel, "mode": result.mode, "cuda_graphs": result.extra.get("cuda_graphs"),
            "global_batch": args.global_batch, "micro": args.micro, "grad_accum": cfg.grad_accum,
            "seq_len": args.seq, "steps": args.steps, "timed_steps": timed, "steps_per_s": round(rate, 3),
            "tokens_per_s": round(tokens, 1), "tokens_per_s_per_gpu": round(tokens / info.world_size, 1),
            "wall_s": round(wall, 2), "ranks": result.extra["ranks"],
            "train": [{k: r[k] for k in ("step", *TRAJECTORY_KEYS)} for r in result.log["train"]]}
        if args.reference is not None:
            ref = json.loads(args.reference.read_text())
            out["vs_reference"] = {"file": str(args.reference), **compare(out["train"], ref["train"]),
                                   "speedup": round(rate / ref["steps_per_s"], 3),
                                   "scaling_efficiency": round(rate / ref["steps_per_s"] / info.world_size, 3)}
        write_json(args.out, out)
        peaks = [r["peak_memory_gib"] for r in out["ranks"]]
        print(f"{args.parent} {result.mode} x{info.world_size}: {rate:.2f} steps/s, {tokens:.0f} tokens/s, "
              f"peak GiB per rank {peaks}, last loss {out['train'][-1]['loss']:.5f}"
              + (f", vs reference {out['vs_reference']}" if "vs_reference" in out else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(finish_process(main()))
