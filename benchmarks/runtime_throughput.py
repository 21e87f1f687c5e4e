"""Decode throughput of the runtime for Llama-3.1-8B's shape and heterogeneous children (random weights, bf16).

Reports per batch size (1, 64, 256): output tokens/s, inter-token latency, the ratio of the decode step to
the memory-bandwidth floor, the ratio to transformers' generate (batch 1), the manual-CUDA-graph vs
torch.compile comparison, and predicted (from measured per-block costs) vs measured throughput of three
children. Writes JSON to --out.

    python benchmarks/runtime_throughput.py --out benchmarks/results/runtime_throughput.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import metadata

from puzzle.bench import bench, format_table, hf_generate_baseline, hf_llama_like, run_workload
from puzzle.blocks import AttentionConfig as A
from puzzle.blocks import BlockConfig, ModelConfig
from puzzle.blocks import FFNConfig as F
from puzzle.costs import CostsConfig, costs_for_workload
from puzzle.model import build_model
from puzzle.presets import llama31_8b_config, tiny_llama_config
from puzzle.workloads import Workload


def children(parent: ModelConfig) -> dict[str, ModelConfig]:
    """Three heterogeneous children of the parent, each with several sub-block kinds."""
    n = parent.num_layers
    full_i = parent.blocks[0].ffn.intermediate_size
    nkv = parent.blocks[0].attention.num_kv_heads

    def pick(i: int, pattern: list[BlockConfig]) -> BlockConfig:
        return pattern[i % len(pattern)]

    p1 = [BlockConfig(A.gqa(nkv), F.swiglu(full_i)), BlockConfig(A.gqa(max(1, nkv // 2)), F.swiglu(full_i // 2)),
          BlockConfig(A.no_op(), F.swiglu(full_i)), BlockConfig(A.gqa(max(1, nkv // 4)), F.linear())]
    p2 = [BlockConfig(A.gqa(max(1, nkv // 8)), F.swiglu(full_i // 4)), BlockConfig(A.linear(), F.swiglu(full_i // 2)),
          BlockConfig(A.gqa(nkv), F.no_op())]
    p3 = [BlockConfig(A.gqa(nkv), F.swiglu(full_i)), BlockConfig(A.no_op(), F.no_op()),
          BlockConfig(A.gqa(max(1, nkv // 2)), F.swiglu(full_i * 3 // 4))]
    return {f"child{k + 1}": parent.with_blocks([pick(i, p) for i in range(n)]) for k, p in enumerate([p1, p2, p3])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="fewer tokens and batches (a smoke run)")
    ap.add_argument("--tiny", action="store_true", help="tiny model shape (CPU smoke test)")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile comparison")
    ap.add_argument("--modes-only", action="store_true", help="only compare the graph modes at batch 1")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    parent_cfg = tiny_llama_config(num_layers=4, max_position_embeddings=4096) if args.tiny else llama31_8b_config()
    prompt, gen = (128, 32) if args.quick else (128, 256)
    batches = [int(b) for b in args.batches.split(",")]
    if args.quick:
        batches = batches[:2]
    out: dict = {"meta": metadata(), "prompt_len": prompt, "gen_len": gen, "batches": batches}
    parent = build_model(parent_cfg, device=device, dtype=dtype, seed=0).eval()

    # 1. manual CUDA graph vs torch.compile(reduce-overhead) vs eager, parent at batch 1.
    w1 = Workload("b1", 1, prompt, gen)
    out["graph_modes"] = {}
    graph_modes(parent, w1, ["manual", "none"], out)
    save(args.out, out)
    if args.modes_only:
        batches = []

    # 2. parent and children at each batch; roofline; predicted vs measured.
    child_cfgs = children(parent_cfg)
    models = {"parent": parent}
    out["results"] = []
    for b in batches:
        w = Workload(f"batch{b}", b, prompt, gen)
        blocks = list(parent_cfg.blocks) + [x for c in child_cfgs.values() for x in c.blocks]
        costs_cfg = CostsConfig(workloads=[w], repeats=5 if args.quick else 10, input_sets=2 if args.quick else 3,
                                mode="measure" if device.type == "cuda" else "estimate",
                                dtype="bfloat16" if device.type == "cuda" else "float32")
        costs = costs_for_workload(parent_cfg, blocks, w, costs_cfg)
        out.setdefault("costs", {})[w.name] = costs
        for name, cfg in child_cfgs.items():
            models[name] = build_model(cfg, device=device, dtype=dtype, seed=1).eval()
        report = bench(models, [w], repeats=2, costs={w.name: costs})
        for name in list(models)[1:]:
            del models[name]  # free the children before the next batch
        torch.cuda.empty_cache() if device.type == "cuda" else None
        if b == 1 and not args.no_hf:
            hf = hf_llama_like(parent_cfg, device, dtype)
            r = report["results"][0]
            r["hf_generate"] = hf_generate_baseline(hf, w, parent_cfg.vocab_size, repeats=2)
            r["hf_generate"]["runtime_speedup"] = r["output_tokens_per_s"] / r["hf_generate"]["output_tokens_per_s"]
            del hf
        out["results"] += report["results"]
        print(format_table(report), flush=True)
        save(args.out, out)
    # 3. torch.compile(reduce-overhead) last: its compile time is long and it may fail on some versions.
    if not args.no_compile and device.type == "cuda":
        graph_modes(parent, w1, ["fused", "compile"], out)
    save(args.out, out)
    print(f"wrote {args.out}")


def graph_modes(model, w: Workload, modes: list[str], out: dict) -> None:
    for mode in modes:
        try:
            out["graph_modes"][mode] = run_workload(model, w, graphs=mode, repeats=3)
        except Exception as e:  # noqa: BLE001  record why a mode failed, keep benchmarking the others
            out["graph_modes"][mode] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(mode, out["graph_modes"][mode], flush=True)


def save(path: str, out: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
