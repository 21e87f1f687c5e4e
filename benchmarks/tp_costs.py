"""Tensor-parallel costs as the costs stage measures them: per-variant decode-step costs of the Llama-3.1-8B
shape (random weights, bf16) at TP 1, 2 (and 4 when that many GPUs are visible) for one workload, and the
parent's whole decode step at each degree (the calibration's timing of the whole parent).

Each degree runs `puzzle.costs.stage.costs_for_workload` exactly as `puzzle costs` does: TP 1 in this process
(the runtime's default graphs mode), TP n on n spawned ranks over NCCL (`puzzle.costs.tensor_parallel`, CUDA
graphs captured eagerly: "manual"). The estimate of the same workload at each degree is recorded beside it.

    python benchmarks/tp_costs.py --out benchmarks/results/tp_costs_h200x2.json            # 2 GPUs: TP 1, 2
    python benchmarks/tp_costs.py --tiny --out /tmp/tp_costs.json                          # CPU smoke (gloo)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import metadata

from puzzle.core.artifacts import write_json
from puzzle.core.workloads import Workload
from puzzle.costs.stage import CostsConfig, costs_for_workload
from puzzle.model.blocks import AttentionConfig as A
from puzzle.model.blocks import BlockConfig, ModelConfig
from puzzle.model.blocks import FFNConfig as F
from puzzle.model.presets import llama31_8b_config, tiny_llama_config


def search_space(parent: ModelConfig) -> list[BlockConfig]:
    """The parent's blocks and a ladder of narrower variants (every width divisible by 4)."""
    nkv, full = parent.blocks[0].attention.num_kv_heads, parent.blocks[0].ffn.intermediate_size
    atts = [A.gqa(max(1, nkv // d)) for d in (1, 2, 4, 8)] + [A.linear(), A.no_op()]
    ffns = [F.swiglu(full * f // 4) for f in (4, 3, 2, 1)] + [F.linear(), F.no_op()]
    blocks = [BlockConfig(a, parent.blocks[0].ffn) for a in atts] + [BlockConfig(parent.blocks[0].attention, f)
                                                                     for f in ffns]
    return [*parent.blocks, *dict.fromkeys(blocks)]


def per_degree(data: dict[str, Any]) -> dict[str, Any]:
    """What the comparison needs of one costs file: decode steps per variant, fixed, the whole parent."""
    cal = data.get("calibration") or {}
    return {
        "kind": data["kind"], "device": data["device"], "graphs": data.get("graphs"),
        "decode_step_s": {part: {name: rec["decode_step_s"] for name, rec in data[part].items()}
                          for part in ("attention", "ffn")},
        "decode_spread_s": {part: {name: rec["decode_spread_s"] for name, rec in data[part].items()}
                            for part in ("attention", "ffn")},
        "fixed_decode_step_s": data["fixed"]["decode_step_s"],
        "parent_decode_step_s": (cal.get("parent_measured") or {}).get("decode_step_s"),
        "parent_decode_sum_s": (cal.get("parent_uncalibrated") or {}).get("decode_step_s"),
        "decode_scale": cal.get("decode_scale"), "calibration_note": cal.get("reason"),
        "tensor_parallel": data.get("tensor_parallel"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--degrees", default=None, help="e.g. 1,2,4 (default: 1, 2 and 4 as far as GPUs allow)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--graphs", default="auto", help="TP 1's runtime graphs mode (TP n: always 'manual')")
    ap.add_argument("--keep", action="store_true", help="keep the other degrees already in --out (one call per degree)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: a tiny model over gloo")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    if args.degrees:
        degrees = [int(x) for x in args.degrees.split(",")]
    else:
        have = torch.cuda.device_count() if cuda else 2
        degrees = [d for d in (1, 2, 4) if d <= have]
    parent = llama31_8b_config() if not args.tiny else tiny_llama_config(num_layers=2, hidden_size=128,
                                                                        intermediate_size=256,
                                                                        max_position_embeddings=1024)
    blocks = search_space(parent)
    base = Workload("bench", args.batch, args.prompt, args.gen)
    measure = CostsConfig(mode="measure", device="cuda" if cuda else "cpu",
                          dtype="bfloat16" if cuda else "float32", repeats=args.repeats, graphs=args.graphs,
                          **({} if cuda else {"warmup": 1, "input_sets": 1, "decode_inner": 2, "neighbours": 2}))
    out: dict[str, Any] = {**metadata(), "model": "llama-3.1-8b shape (random weights)" if not args.tiny else "tiny",
                           "workload": base.to_dict(), "degrees": degrees, "gpus_visible": torch.cuda.device_count(),
                           "measured": {}, "estimate": {}}
    if args.keep and Path(args.out).exists():  # an earlier call's degrees, for one comparison across calls
        old = json.loads(Path(args.out).read_text())
        if old.get("workload") == out["workload"] and old.get("model") == out["model"]:
            for key in ("measured", "estimate"):
                out[key] = {d: v for d, v in old[key].items() if int(d) not in degrees}
            out["earlier_calls"] = [*old.get("earlier_calls", []), {k: old.get(k) for k in ("date", "command", "git_commit")}]
    for n in degrees:
        w = replace(base, tensor_parallel=n)
        print(f"== TP {n}", flush=True)
        out["measured"][str(n)] = per_degree(costs_for_workload(parent, blocks, w, measure))
        out["estimate"][str(n)] = per_degree(costs_for_workload(parent, blocks, w, CostsConfig(mode="estimate")))
        write_json(Path(args.out), out)  # partial results survive a later degree's failure
    done = sorted(out["measured"], key=int)
    one = out["measured"][done[0]]["parent_decode_step_s"]
    out[f"parent_step_speedup_vs_tp{done[0]}"] = {
        n: (one / step if one and step else None)
        for n in done if (step := out["measured"][n]["parent_decode_step_s"]) is not None}
    write_json(Path(args.out), out)
    for n in done:
        m = out["measured"][n]
        print(f"TP {n}: parent decode step {m['parent_decode_step_s']}, per-block sum {m['parent_decode_sum_s']} "
              f"({m['graphs']})")
    print(f"wrote {args.out}")


if __name__ == "__main__":  # the TP ranks are spawned: they import this module again
    main()
