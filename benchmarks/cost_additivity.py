"""Do per-block decode costs add up to a model's decode step? Where they do not, which kernels differ?

Llama-3.1-8B shape, random weights, bf16, one workload (default: batch 1, prompt 128 + 128 generated). In
one process it times the decode step (the runtime's captured graph) of
- whole models: the parent and six heterogeneous children;
- the stacks `puzzle.costs.stage` times today ("isolated": k copies of one variant with the other half a no-op);
- "neighbourhood" stacks: N layers of one variant with the parent's other half (the variant in a parent-like
  model), and the same N layers with that variant a no-op;
and, for each, the GPU time of every kernel of one step (torch.profiler over graph replays), so a block that
runs slower inside one model than inside another shows by kernel. It then predicts every whole model from
each method's per-variant costs (raw and calibrated on the parent) and reports the errors.

    python benchmarks/cost_additivity.py --out benchmarks/results/cost_additivity.json [--batch 1]
    python benchmarks/cost_additivity.py --tiny --out /tmp/ca.json       # CPU smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _kernels import kernel_times
from _meta import metadata
from runtime_throughput import children

from puzzle.core.workloads import Workload
from puzzle.model.blocks import AttentionConfig as A
from puzzle.model.blocks import BlockConfig, ModelConfig
from puzzle.model.blocks import FFNConfig as F
from puzzle.model.decoder import build_model
from puzzle.model.memory import mean_decode_context
from puzzle.model.presets import llama31_8b_config, tiny_llama_config
from puzzle.runtime.bench import DEFAULT_BUCKET
from puzzle.runtime.engine import Engine
from puzzle.runtime.timing import summarize, sync, time_calls


def validation_children(parent: ModelConfig) -> dict[str, ModelConfig]:
    """Three more children, unlike the three of runtime_throughput.py: uniform, random, half-and-half."""
    n, full = parent.num_layers, parent.blocks[0].ffn.intermediate_size
    nkv = parent.blocks[0].attention.num_kv_heads
    atts = [A.gqa(max(1, nkv // d)) for d in (1, 2, 4, 8)] + [A.linear(), A.no_op()]
    ffns = [F.swiglu(full * f // 4) for f in (4, 3, 2, 1)] + [F.linear(), F.no_op()]
    rng = random.Random(5)
    small = BlockConfig(A.gqa(max(1, nkv // 8)), F.swiglu(full // 4))
    return {
        "child4": parent.with_blocks([BlockConfig(A.gqa(max(1, nkv // 4)), F.swiglu(full // 2))] * n),
        "child5": parent.with_blocks([BlockConfig(rng.choice(atts), rng.choice(ffns)) for _ in range(n)]),
        "child6": parent.with_blocks([parent.blocks[i] if i < n // 2 else small for i in range(n)]),
    }


def stack(parent: ModelConfig, blocks: list[BlockConfig], seq: int, vocab: int = 64) -> ModelConfig:
    return replace(parent, vocab_size=vocab, blocks=tuple(blocks), tie_word_embeddings=False,
                   max_position_embeddings=max(parent.max_position_embeddings, seq))


def ready_engine(config: ModelConfig, w: Workload, ctx: int, device: torch.device, dtype: torch.dtype
                 ) -> tuple[Engine, Any]:
    """A prefilled engine and a function running one decode step that reads `ctx` cache slots."""
    model = build_model(config, device=device, dtype=dtype, seed=0).eval()
    engine = Engine(model, w.batch_size, max(w.prompt_len, ctx) + 1, bucket=1)
    engine.prefill(torch.randint(0, config.vocab_size, (w.batch_size, w.prompt_len), device=device))
    return engine, engine.decode_at(ctx, torch.randint(0, config.vocab_size, (w.batch_size,), device=device))


def kernel_profile(step: Any, device: torch.device, steps: int = 3) -> dict[str, Any]:
    """GPU time of every kernel of one step (graph replays included): per-name totals, sum, count."""
    if device.type != "cuda":
        return {}
    per: dict[str, list[float]] = defaultdict(list)
    for name, times in kernel_times(step, device, steps).items():
        per[name[:120]] += times  # names that share their first 120 characters are one row
    rows = {k: {"us": sum(v) / steps, "calls": len(v) / steps} for k, v in per.items()}
    return {"kernel_sum_us": sum(r["us"] for r in rows.values()),
            "kernel_calls": sum(r["calls"] for r in rows.values()), "kernels": rows}


@torch.inference_mode()
def generation_loop(model: torch.nn.Module, w: Workload, device: torch.device) -> dict[str, Any]:
    """The decode loop as `puzzle bench` runs it (bucketed prefix, argmax each step): inter-token seconds
    (best of 3 runs) and the GPU kernel time per step in one more, profiled run."""
    engine = Engine(model, w.batch_size, w.max_seq_len, bucket=DEFAULT_BUCKET)
    ids = torch.randint(0, model.config.vocab_size, (w.batch_size, w.prompt_len), device=device)
    steps = w.gen_len - 1

    def decode_all() -> None:
        tok = engine.prefill(ids).argmax(-1)
        sync(device)
        for _ in range(steps):
            tok = engine.decode(tok).argmax(-1)

    decode_all()  # captures the graphs
    best = float("inf")
    for _ in range(3):
        tok = engine.prefill(ids).argmax(-1)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = engine.decode(tok).argmax(-1)
        sync(device)
        best = min(best, (time.perf_counter() - t0) / steps)
    prof = kernel_profile(decode_all, device, steps=1)
    prof.pop("kernels", None)
    return {"inter_token_s": best, **{f"loop_{k}": v / steps for k, v in prof.items()}}


def measure(name: str, config: ModelConfig, w: Workload, ctx: int, device: torch.device, dtype: torch.dtype,
            repeats: int, inner: int, loop: bool = False) -> dict[str, Any]:
    t0 = time.perf_counter()
    engine, step = ready_engine(config, w, ctx, device, dtype)
    s = summarize(time_calls(step, device, repeats, warmup=3, inner=inner))
    out = {"step_s": s["median_s"], "rel_spread": s["rel_spread"], **kernel_profile(step, device)}
    if loop:
        out["generation"] = generation_loop(engine.model, w, device)
        print(f"{name:28s} generation loop {out['generation']}", flush=True)
    out["wall_s"] = time.perf_counter() - t0
    print(f"{name:28s} {s['median_s'] * 1e6:9.1f} us  spread {s['rel_spread']:.3f}  "
          f"kernels {out.get('kernel_sum_us', 0):9.1f} us x{out.get('kernel_calls', 0):.0f}", flush=True)
    del engine, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def per_variant(t: dict[str, dict[str, Any]], plan: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each method's per-layer decode-step cost of every variant, from the timed stacks."""
    out: dict[str, dict[str, float]] = {"isolated": {}, "neighbourhood": {}}
    for key, (k, _) in plan["isolated"].items():
        out["isolated"][key] = (t[f"iso:{key}"]["step_s"] - t["base"]["step_s"]) / k
    n = plan["n"]
    for key, ref in plan["neighbourhood"].items():
        out["neighbourhood"][key] = (t[f"nbr:{key}"]["step_s"] - t[f"nbr:{ref}"]["step_s"]) / n
    return out


def predictions(costs: dict[str, dict[str, float]], t: dict[str, dict[str, Any]],
                models: dict[str, ModelConfig]) -> dict[str, Any]:
    """Predicted step of every whole model under each method, raw and scaled to the parent; errors.

    The scale is fitted on the parent, so the max errors are over the children only (raw and scaled alike,
    one set of models); the parent's raw error is kept apart.
    """
    fixed = t["fixed"]["step_s"]
    out: dict[str, Any] = {}
    for method, c in costs.items():
        def blocks(cfg: ModelConfig) -> float:
            return sum(c.get(f"att:{b.attention.name}", 0.0) + c.get(f"ffn:{b.ffn.name}", 0.0)  # noqa: B023
                       for b in cfg.blocks)

        scale = (t["parent"]["step_s"] - fixed) / blocks(models["parent"])
        rows = {}
        for name, cfg in models.items():
            raw, measured = fixed + blocks(cfg), t[name]["step_s"]
            cal = fixed + scale * blocks(cfg)
            rows[name] = {"measured_s": measured, "raw_s": raw, "raw_err": raw / measured - 1,
                          "scaled_s": cal, "scaled_err": cal / measured - 1}
        kids = [r for n, r in rows.items() if n != "parent"]
        out[method] = {"scale": scale, "fitted_on": "parent", "models": rows, "parent_raw_err": rows["parent"]["raw_err"],
                       "max_abs_raw_err": max(abs(r["raw_err"]) for r in kids),
                       "max_abs_scaled_err": max(abs(r["scaled_err"]) for r in kids)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--shape", default="8b", choices=["8b", "ref-s"],
                    help="the parent's shape: Llama-3.1-8B, or the reference run's 16-layer model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--inner", type=int, default=10)
    ap.add_argument("--neighbours", type=int, default=4, help="layers of a neighbourhood stack")
    ap.add_argument("--stack-bytes", type=int, default=256 << 20)
    ap.add_argument("--rescore", type=Path, help="a result of this script whose run stopped before the end: its "
                    "predictions for the models it did time (every stack is timed before the models)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        parent = tiny_llama_config(num_layers=4, num_kv_heads=4, max_position_embeddings=4096)
    elif args.shape == "ref-s":
        from cost_model_ref_s import ref_s_config

        parent = ref_s_config(None)
    else:
        parent = llama31_8b_config()
    w = Workload(f"batch{args.batch}", args.batch, args.prompt, args.gen)
    ctx = mean_decode_context(w, 128)
    models = {"parent": parent, **children(parent), **validation_children(parent)}
    if args.shape == "ref-s" and not args.tiny:  # the children the reference run's cost-model check uses
        from cost_model_ref_s import children as ref_s_children

        models.update({f"ref-{k}": v for k, v in ref_s_children(parent).items()})
    p_att, p_ffn = parent.blocks[0].attention, parent.blocks[0].ffn
    atts = list(dict.fromkeys(b.attention for m in models.values() for b in m.blocks if b.attention.kind != "no_op"))
    ffns = list(dict.fromkeys(b.ffn for m in models.values() for b in m.blocks if b.ffn.kind != "no_op"))
    eb, n = dtype.itemsize, args.neighbours
    seq = ctx + 1
    empty = BlockConfig(A.no_op(), F.no_op())
    plan: dict[str, Any] = {"n": n, "isolated": {}, "neighbourhood": {}}
    configs: dict[str, ModelConfig] = {"base": stack(parent, [empty], seq),
                                       "fixed": stack(parent, [empty], seq, parent.vocab_size)}
    variants = [(f"att:{a.name}", BlockConfig(a, F.no_op()), BlockConfig(a, p_ffn), "att:no_op") for a in atts]
    variants += [(f"ffn:{f.name}", BlockConfig(A.no_op(), f), BlockConfig(p_att, f), "ffn:no_op") for f in ffns]
    configs["nbr:att:no_op"] = stack(parent, [BlockConfig(A.no_op(), p_ffn)] * n, seq)
    configs["nbr:ffn:no_op"] = stack(parent, [BlockConfig(p_att, F.no_op())] * n, seq)
    for key, iso, nbr, ref in variants:
        k = max(1, min(8, math.ceil(args.stack_bytes / (parent.block_param_count(iso) * eb))))
        plan["isolated"][key] = (k, iso.to_dict())
        plan["neighbourhood"][key] = ref
        configs[f"iso:{key}"] = stack(parent, [iso] * k, seq)
        configs[f"nbr:{key}"] = stack(parent, [nbr] * n, seq)
    configs.update(models)
    out: dict[str, Any] = {"meta": metadata(), "benchmark": "cost_additivity", "workload": w.to_dict(),
                           "decode_context": ctx, "device": torch.cuda.get_device_name() if device.type == "cuda"
                           else "cpu", "plan": plan, "timed": {}}
    if args.rescore:
        out = json.loads(args.rescore.read_text())
        if any(name not in out["timed"] for name in ("base", "fixed", "parent", *(f"nbr:{k}" for k in plan["neighbourhood"]))):
            sys.exit(f"{args.rescore} lacks the stacks or the parent; nothing to predict from")
        models = {name: cfg for name, cfg in models.items() if name in out["timed"]}
        out["rescored"] = {"meta": metadata(), "models": list(models), "from": str(args.rescore)}
    else:
        for name, cfg in configs.items():
            out["timed"][name] = measure(name, cfg, w, ctx, device, dtype, args.repeats, args.inner, name in models)
            Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    out["per_variant_s"] = per_variant(out["timed"], out["plan"])
    out["predictions"] = predictions(out["per_variant_s"], out["timed"], models)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    for method, p in out["predictions"].items():
        print(f"{method}: scale {p['scale']:.4f}  children max |err| raw {p['max_abs_raw_err']:.3f} "
              f"scaled {p['max_abs_scaled_err']:.3f}  (parent raw {p['parent_raw_err']:+.3f})")
        for name, r in p["models"].items():
            print(f"  {name:8s} measured {r['measured_s'] * 1e3:7.3f} ms  raw {r['raw_err']:+.3f}  "
                  f"scaled {r['scaled_err']:+.3f}")
    print(f"median spread {statistics.median(r['rel_spread'] for r in out['timed'].values()):.4f}")


if __name__ == "__main__":
    main()
