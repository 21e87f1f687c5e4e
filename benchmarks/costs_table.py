"""Cost table for Llama-3.1-8B's shape (random weights, bf16) on this GPU (issue 8's evidence).

Every attention variant (GQA 8/4/2/1 KV heads, linear, no-op) and FFN variant (SwiGLU at 100/75/50/25/10%
of 14336, linear, no-op): prefill time, decode-step time, params, KV bytes/token, and the relative spread
(IQR / median) of repeated measurements (target: median < 3%), measured by `puzzle.costs.stage` with the
runtime's default graph mode, plus the calibration against the whole parent. Writes JSON to --out.

    python benchmarks/costs_table.py --out benchmarks/results/costs_table.json [--workloads batch1,chatbot]

`benchmarks/runtime_throughput.py --table-out ...` writes the same table from the costs it measures anyway.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import metadata

from puzzle.core.workloads import DEFAULT_WORKLOADS, Workload, workload_by_name
from puzzle.costs.stage import CostsConfig, costs_for_workload
from puzzle.model.blocks import AttentionConfig as A
from puzzle.model.blocks import BlockConfig, ModelConfig
from puzzle.model.blocks import FFNConfig as F
from puzzle.model.presets import llama31_8b_config

# The default workloads whose prompts are short enough to time every variant in a minute or two, and
# batch 64 with the same prompt and generated lengths as "chatbot" (batch 256).
EXTRA_WORKLOADS = (Workload("chatbot-b64", 64, 128, 128),)


def variant_blocks(parent: ModelConfig) -> list[BlockConfig]:
    """One block per attention variant (FFN no-op) and per FFN variant (attention no-op)."""
    full = parent.blocks[0].ffn.intermediate_size
    nkv = parent.blocks[0].attention.num_kv_heads
    atts = [A.gqa(k) for k in (nkv, nkv // 2, nkv // 4, nkv // 8) if k >= 1] + [A.linear(), A.no_op()]
    step = 256 if full >= 4096 else 16  # round like the library does at 8B (tiny shapes: 16)
    ffns = [F.swiglu(full)] + [F.swiglu(max(step, round(full * f / step) * step)) for f in (0.75, 0.5, 0.25, 0.1)]
    ffns += [F.linear(), F.no_op()]
    return [BlockConfig(a, F.no_op()) for a in atts] + [BlockConfig(A.no_op(), f) for f in ffns]


def table_summary(costs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Median relative spread over every timed (non-no-op) variant and phase, and the target check."""
    spreads = [r[k] for data in costs.values() for part in ("attention", "ffn") for r in data[part].values()
               if r["params"] and not r["oom"] for k in ("prefill_rel_spread", "decode_rel_spread")]
    med = statistics.median(spreads) if spreads else None
    return {"median_rel_spread": med, "spread_target": 0.03, "spread_target_met": med is not None and med < 0.03}


def print_table(data: dict[str, Any]) -> None:
    w = data["workload"]
    label = " (ESTIMATE)" if data["kind"] == "estimate" else ""
    print(f"\n{w['name']}: batch {w['batch_size']}, prompt {w['prompt_len']}, gen {w['gen_len']}, "
          f"decode context {data['decode_context']}, graphs {data['graphs']}{label}")
    print(f"{'variant':<22} {'prefill ms':>11} {'decode us':>10} {'spread%':>8} {'params M':>9} {'KV B/tok':>9}")
    for part in ("attention", "ffn"):
        for name, r in data[part].items():
            if r["oom"]:
                print(f"{part + ':' + name:<22} does not fit in device memory")
                continue
            spread = max(r["prefill_rel_spread"], r["decode_rel_spread"])
            print(f"{part + ':' + name:<22} {r['prefill_s'] * 1e3:>11.3f} {r['decode_step_s'] * 1e6:>10.1f} "
                  f"{spread * 100:>8.2f} {r['params'] / 1e6:>9.1f} {r['kv_bytes_per_token']:>9}")
    print(f"fixed: prefill {data['fixed']['prefill_s'] * 1e3:.3f} ms, decode {data['fixed']['decode_step_s'] * 1e6:.1f}"
          f" us; calibration: {json.dumps(data.get('calibration'), default=str)[:300]}")


def write_table(path: str | Path, costs: dict[str, dict[str, Any]], cfg: CostsConfig) -> dict[str, Any]:
    out = {"meta": metadata(), "benchmark": "costs_table", "model": "Llama-3.1-8B shape, random weights",
           "config": {"repeats": cfg.repeats, "warmup": cfg.warmup, "input_sets": cfg.input_sets,
                      "decode_inner": cfg.decode_inner, "graphs": cfg.graphs, "calibrate": cfg.calibrate},
           **table_summary(costs), "workloads": costs}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return out


def resolve(names: str) -> list[Workload]:
    known = list(DEFAULT_WORKLOADS) + list(EXTRA_WORKLOADS)
    return [workload_by_name(n, known) for n in names.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--workloads", default="batch1,chatbot-b64,chatbot",
                    help=f"comma list of {[w.name for w in DEFAULT_WORKLOADS + EXTRA_WORKLOADS]}")
    ap.add_argument("--mode", default="auto", choices=["auto", "measure", "estimate"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--input-sets", type=int, default=3)
    args = ap.parse_args()
    parent = llama31_8b_config()
    cfg = CostsConfig(mode=args.mode, repeats=args.repeats, input_sets=args.input_sets)
    costs = {}
    for w in resolve(args.workloads):
        costs[w.name] = costs_for_workload(parent, variant_blocks(parent) + list(parent.blocks), w, cfg)
        print_table(costs[w.name])
        out = write_table(args.out, costs, cfg)
    print(f"\nmedian relative spread: {out['median_rel_spread']}; wrote {args.out}")


if __name__ == "__main__":
    main()
