"""Cost table for Llama-3.1-8B's shape (random weights, bf16) on this GPU for the default workloads.

Every attention variant (GQA 8/4/2/1 KV heads, linear, no-op) and FFN variant (SwiGLU at 100/75/50/25/10%
of 14336, linear, no-op): prefill time, decode-step time, params, KV bytes/token, and the relative spread
of repeated measurements (target: median < 3%). Writes JSON to --out.

    python benchmarks/costs_table.py --out benchmarks/results/costs_table.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import metadata

from puzzle.blocks import AttentionConfig as A
from puzzle.blocks import BlockConfig
from puzzle.blocks import FFNConfig as F
from puzzle.costs import CostsConfig, costs_for_workload
from puzzle.presets import llama31_8b_config
from puzzle.workloads import DEFAULT_WORKLOADS, Workload


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="two workloads, fewer repeats")
    ap.add_argument("--mode", default="auto", choices=["auto", "measure", "estimate"])
    args = ap.parse_args()
    parent = llama31_8b_config()
    full = 14336
    atts = [A.gqa(8), A.gqa(4), A.gqa(2), A.gqa(1), A.linear(), A.no_op()]
    ffns = [F.swiglu(full)] + [F.swiglu(round(full * f / 256) * 256) for f in (0.75, 0.5, 0.25, 0.1)]
    ffns += [F.linear(), F.no_op()]
    blocks = [BlockConfig(a, F.no_op()) for a in atts] + [BlockConfig(A.no_op(), f) for f in ffns]
    workloads = list(DEFAULT_WORKLOADS)
    if args.quick:
        workloads = [Workload("chatbot-b64", 64, 128, 128), Workload("chatbot", 256, 128, 128)]
    cfg = CostsConfig(workloads=workloads, mode=args.mode, repeats=5 if args.quick else 10,
                      input_sets=2 if args.quick else 3)
    out = {"meta": metadata(), "config": {"repeats": cfg.repeats, "input_sets": cfg.input_sets}, "workloads": {}}
    spreads = []
    for w in workloads:
        data = costs_for_workload(parent, blocks, w, cfg)
        out["workloads"][w.name] = data
        label = " (ESTIMATE)" if data["kind"] == "estimate" else ""
        print(f"\n{w.name}: batch {w.batch_size}, prompt {w.prompt_len}, gen {w.gen_len}, "
              f"decode context {data['decode_context']}{label}")
        print(f"{'variant':<22} {'prefill ms':>11} {'decode us':>10} {'spread%':>8} {'params M':>9} {'KV B/tok':>9}")
        for part in ("attention", "ffn"):
            for name, r in data[part].items():
                if r["oom"]:
                    print(f"{part + ':' + name:<22} does not fit in device memory")
                    continue
                spread = max(r["prefill_rel_spread"], r["decode_rel_spread"])
                if r["params"]:
                    spreads += [r["prefill_rel_spread"], r["decode_rel_spread"]]
                print(f"{part + ':' + name:<22} {r['prefill_s'] * 1e3:>11.3f} {r['decode_step_s'] * 1e6:>10.1f} "
                      f"{spread * 100:>8.2f} {r['params'] / 1e6:>9.1f} {r['kv_bytes_per_token']:>9}")
        print(f"fixed: prefill {data['fixed']['prefill_s'] * 1e3:.3f} ms, decode {data['fixed']['decode_step_s'] * 1e6:.1f} us"
              f"; parent fits: {data['parent_memory'].get('fits')}")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    out["median_rel_spread"] = statistics.median(spreads) if spreads else None
    Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"\nmedian relative spread: {out['median_rel_spread']}; wrote {args.out}")


if __name__ == "__main__":
    main()
