"""Decode throughput of the runtime for Llama-3.1-8B's shape and heterogeneous children (issue 5's evidence).

Random weights, bf16. Per batch size (1, 64, 256): output tokens/s, inter-token latency, decode step over
the memory-bandwidth floor, and predicted (from per-block costs measured in the same process, calibrated
against the whole parent) vs measured throughput of the parent and three children; at batch 1 the graph
modes side by side and transformers' generate with its default dynamic cache and with its static cache.
Writes JSON to --out (and, with --table-out, the cost table of `benchmarks/costs_table.py` from the same
measured costs).

    python benchmarks/runtime_throughput.py --out benchmarks/results/runtime_throughput.json \
        --table-out benchmarks/results/costs_table.json
    python benchmarks/runtime_throughput.py --tiny --out /tmp/rt.json      # CPU smoke run (seconds)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _graph_modes
from _meta import metadata
from calibration_scores import FITTED_ON, held_out_errors
from costs_table import print_table, variant_blocks, write_table

from puzzle.core.workloads import Workload
from puzzle.costs.stage import CostsConfig, costs_for_workload
from puzzle.costs.table import predict
from puzzle.model.blocks import AttentionConfig as A
from puzzle.model.blocks import BlockConfig, ModelConfig
from puzzle.model.blocks import FFNConfig as F
from puzzle.model.decoder import build_model
from puzzle.model.presets import llama31_8b_config, tiny_llama_config
from puzzle.runtime.bench import bench, format_table, hf_generate_baseline, hf_llama_like

TARGETS = {"hf_speedup_batch1": 3.0, "floor_ratio_batch1": 1.3, "prediction_rel_error": 0.05}


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


def with_method(costs: dict[str, Any], method: str) -> dict[str, Any]:
    """The same costs with another calibration method applied (for the comparison in the results)."""
    out = copy.copy(costs)
    cal = costs.get("calibration")
    if isinstance(cal, dict) and "decode_scale" in cal:
        out["calibration"] = {**cal, "method": method}
    return out


def cost_model_rows(report: dict[str, Any], configs: dict[str, ModelConfig], costs: dict[str, Any],
                    w: Workload) -> list[dict[str, Any]]:
    """Measured vs predicted output tokens/s for every model, under each calibration method."""
    rows = []
    for r in report["results"]:
        row = {"model": r["model"], "workload": w.name, "measured_tok_s": r["output_tokens_per_s"],
               "graphs": r["graphs"], "calibration_fitted_on_this_model": r["model"] == FITTED_ON}
        for method in ("none", "scale", "offset"):
            pred = predict(configs[r["model"]], with_method(costs, method), w)["output_tokens_per_s"]
            row[f"predicted_tok_s_{method}"] = pred
            row[f"rel_error_{method}"] = pred / r["output_tokens_per_s"] - 1
        rows.append(row)
    return rows


def graph_modes(model: torch.nn.Module, w: Workload, modes: list[str]) -> dict[str, Any]:
    out = {}
    for mode in modes:
        t0 = time.perf_counter()
        try:
            out[mode] = _graph_modes.run_workload(model, w, mode, repeats=2)  # library or benchmark mode
        except Exception as e:  # noqa: BLE001  record why a mode failed, keep benchmarking the others
            out[mode] = {"error": f"{type(e).__name__}: {e}"[:500]}
        out[mode]["wall_s_incl_compile"] = time.perf_counter() - t0
        print(mode, out[mode], flush=True)
    return out


def summarize(out: dict[str, Any]) -> dict[str, Any]:
    s: dict[str, Any] = {"targets": TARGETS}
    b1 = [r for r in out["results"] if r["workload"]["batch_size"] == 1 and r["model"] == "parent"]
    if b1:
        s["floor_ratio_batch1"] = b1[0].get("roofline", {}).get("ratio_to_floor")
        s["floor_target_met"] = s["floor_ratio_batch1"] is not None and s["floor_ratio_batch1"] <= TARGETS[
            "floor_ratio_batch1"]
    for key, hf in out.get("hf_generate", {}).items():
        if "runtime_speedup" in hf:
            s[f"hf_{key}_speedup_batch1"] = hf["runtime_speedup"]
            s[f"hf_{key}_target_met"] = hf["runtime_speedup"] >= TARGETS["hf_speedup_batch1"]
    rows = [r for r in out.get("cost_model", []) if r["model"] != FITTED_ON]  # the calibration's own fit apart
    for method in ("none", "scale", "offset"):
        errs = [abs(r[f"rel_error_{method}"]) for r in rows]
        if errs:
            s[f"max_abs_rel_error_{method}"] = max(errs)  # children only
    if rows:
        s["cost_model_errors"] = held_out_errors(out["cost_model"])
        s["prediction_target_met"] = s["max_abs_rel_error_scale"] <= TARGETS["prediction_rel_error"]
    return s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--table-out", default=None, help="also write the cost table (costs_table.py's format)")
    ap.add_argument("--tiny", action="store_true", help="tiny model shape (CPU smoke test)")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10, help="cost timing repeats")
    ap.add_argument("--input-sets", type=int, default=3)
    ap.add_argument("--modes", default="fused,manual,none",
                    help="graph modes compared at batch 1 (also compile: benchmarks/_graph_modes.py)")
    ap.add_argument("--hf", default="dynamic,static", help="transformers caches to compare at batch 1 ('' = none)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    parent_cfg = tiny_llama_config(num_layers=4, num_kv_heads=4, max_position_embeddings=4096) if args.tiny \
        else llama31_8b_config()
    batches = [int(b) for b in args.batches.split(",")]
    out: dict[str, Any] = {"meta": metadata(), "benchmark": "runtime_throughput",
                           "model": "Llama-3.1-8B shape, random weights" if not args.tiny else "tiny",
                           "prompt_len": args.prompt, "gen_len": args.gen, "batches": batches, "results": [],
                           "cost_model": []}
    parent = build_model(parent_cfg, device=device, dtype=dtype, seed=0).eval()
    child_cfgs = children(parent_cfg)
    configs = {"parent": parent_cfg, **child_cfgs}
    blocks = variant_blocks(parent_cfg) + [x for c in configs.values() for x in c.blocks]
    costs_cfg = CostsConfig(repeats=args.repeats, input_sets=args.input_sets,
                            mode="measure" if device.type == "cuda" else "estimate",
                            dtype="bfloat16" if device.type == "cuda" else "float32")
    all_costs: dict[str, Any] = {}

    # 1. Graph modes at batch 1 (fused = the default).
    w1 = Workload("batch1", 1, args.prompt, args.gen)
    if args.modes:
        out["graph_modes"] = graph_modes(parent, w1, args.modes.split(","))
        save(args.out, out)

    # 2. Parent and children at each batch: costs (timed), throughput, roofline, predicted vs measured.
    names = {1: "batch1", 64: "chatbot-b64", 256: "chatbot"} if args.gen == 128 and args.prompt == 128 else {}
    for b in batches:
        w = Workload(names.get(b, f"batch{b}"), b, args.prompt, args.gen)
        t0 = time.perf_counter()
        costs = costs_for_workload(parent_cfg, blocks, w, costs_cfg)
        costs["wall_s"] = time.perf_counter() - t0
        all_costs[w.name] = costs
        print_table(costs)
        if args.table_out:
            write_table(args.table_out, all_costs, costs_cfg)
        models = {"parent": parent}
        for name, cfg in child_cfgs.items():
            models[name] = build_model(cfg, device=device, dtype=dtype, seed=1).eval()
        report = bench(models, [w], repeats=2, predict=lambda config, wl: predict(config, costs, wl))  # noqa: B023
        out["bandwidth_bytes_per_s"] = report["bandwidth_bytes_per_s"]
        out["results"] += report["results"]
        out["cost_model"] += cost_model_rows(report, configs, costs, w)
        del models
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(format_table(report), flush=True)
        out["summary"] = summarize(out)
        save(args.out, out)

    # 3. transformers' generate at batch 1 (the static cache compiles itself: slow to start, so last).
    ref = next((r for r in out["results"] if r["model"] == "parent" and r["workload"]["batch_size"] == 1), None)
    if args.hf and ref is not None:
        hf = hf_llama_like(parent_cfg, device, dtype)
        out["hf_generate"] = {}
        for cache in args.hf.split(","):
            t0 = time.perf_counter()
            try:
                r = hf_generate_baseline(hf, w1, parent_cfg.vocab_size, repeats=2, cache=cache)
                r["runtime_speedup"] = ref["output_tokens_per_s"] / r["output_tokens_per_s"]
            except Exception as e:  # noqa: BLE001  record the failure, keep the other results
                r = {"error": f"{type(e).__name__}: {e}"[:500]}
            r["wall_s_incl_compile"] = time.perf_counter() - t0
            out["hf_generate"][cache] = r
            print("hf", cache, r, flush=True)
            out["summary"] = summarize(out)
            save(args.out, out)
        del hf
    out["summary"] = summarize(out)
    save(args.out, out)
    print(json.dumps(out["summary"], indent=1, default=str))
    print(f"wrote {args.out}")


def save(path: str, out: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
