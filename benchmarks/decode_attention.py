"""Decode attention: SDPA over the masked cache prefix vs the Triton flash-decoding kernel (issue 18).

1. One layer's decode attention at the Llama-3.1-8B attention shape (32 query heads, 8 KV heads, head dim 128),
   batch 64 and 256, context 2048 and 8192, bf16 and FP8 caches, each captured in a CUDA graph: microseconds
   per layer-step and the bytes/s achieved against the KV bytes the step needs (every valid slot once; SDPA on
   an FP8 cache also dequantizes it first, as the runtime does: `LayerCache.read`).
2. The whole decode step of the 8B parent (random weights, bf16) through the runtime engine, prompt 128 + 128
   generated, batch 64 and 256, each cache dtype with decode_attention "sdpa" and "triton": ms per step and
   the ratio to the floor (weights + KV bytes / the measured copy bandwidth, `puzzle.runtime.bench.roofline`;
   the KV at 1 byte per element for the FP8 cache), with the runtime's bucket (128) and exact (bucket 1).

    python benchmarks/decode_attention.py --out $OUT/decode_attention.json   # ~3 min on one H200
    python benchmarks/decode_attention.py --tiny --out /tmp/decode_attention.json   # CPU smoke run (interpreter)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

if "--tiny" in sys.argv or not torch.cuda.is_available():  # CPU: Triton's interpreter, set before triton's import
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import metadata

from puzzle.core.artifacts import write_json
from puzzle.core.workloads import Workload
from puzzle.model.decoder import build_model
from puzzle.model.memory import kv_cache_bytes, mean_decode_context
from puzzle.model.presets import llama31_8b_config, tiny_llama_config
from puzzle.runtime import attention
from puzzle.runtime.bench import DEFAULT_BUCKET, decode_step_bytes, run_workload
from puzzle.runtime.decode_attention import MAX_SPLITS, DecodeConfig, decode_attention, decode_config, resolve
from puzzle.runtime.fp8 import E4M3
from puzzle.runtime.kv_cache import StaticKVCache
from puzzle.runtime.timing import measure_bandwidth, time_calls

CACHES = {"bf16": None, "fp8": E4M3}
SWEEP = ((32, 4), (64, 4), (64, 8), (16, 4))  # (block_n, num_warps), each at the rule's splits and twice them


def captured(fn: Any, device: torch.device) -> Any:
    """fn as a CUDA-graph replay (launch overhead out, as in the runtime's decode step); fn itself on CPU."""
    if device.type != "cuda":
        return fn
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


@torch.inference_mode()
def layer_step(config: Any, batch: int, ctx: int, kv: str, device: torch.device, bandwidth: float,
               args: argparse.Namespace) -> dict[str, Any]:
    """One GQA layer's decode attention over ctx valid slots, SDPA vs the kernel."""
    one = replace(config, blocks=config.blocks[:1])
    cache = StaticKVCache(one, batch, ctx, device, torch.bfloat16, CACHES[kv])
    layer = cache.layers[0]
    gen = torch.Generator(device=device).manual_seed(0)
    nq, nkv, d = config.num_attention_heads, config.blocks[0].attention.num_kv_heads, config.head_dim
    for t in (layer.k, layer.v):  # real values (unit normal), stored as the cache stores them
        x = torch.randn(t.shape, generator=gen, device=device, dtype=torch.bfloat16)
        if layer.k_scale is None:
            t.copy_(x)
        else:
            t.copy_((x.float() * (1 / 0.02)).to(E4M3).view(torch.uint8))
    if layer.k_scale is not None:
        layer.k_scale.fill_(0.02)
        layer.v_scale.fill_(0.02)
    cache.set_slots(torch.tensor([ctx - 1], device=device), attend_len=ctx)
    q = torch.randn(batch, nq, 1, d, generator=gen, device=device, dtype=torch.bfloat16)
    mask = torch.zeros(batch, 1, 1, ctx, device=device, dtype=torch.bfloat16)  # every slot valid (additive)
    outs: dict[str, torch.Tensor] = {}
    row: dict[str, Any] = {"batch": batch, "context": ctx, "cache": kv, "q_heads": nq, "kv_heads": nkv, "head_dim": d,
                           "splits": decode_config(batch, nkv, ctx, d).num_splits}
    needed = 2 * batch * nkv * ctx * d * layer.k.element_size()  # K and V, every valid slot once
    row["kv_bytes_needed"] = needed
    for name, fn in (("sdpa", lambda: attention.attend_prefix(q, mask, layer)),
                     ("triton", lambda: attention.attend_decode(q, layer))):
        outs[name] = fn()
        samples = time_calls(captured(fn, device), device, repeats=args.repeats, warmup=2, inner=args.inner)
        t = statistics.median(samples)
        row[name] = {"us_per_layer_step": t * 1e6, "bytes_per_s": needed / t, "fraction_of_copy_bandwidth":
                     needed / t / bandwidth}
    row["max_abs_diff"] = float((outs["sdpa"].float() - outs["triton"].float()).abs().max())
    if args.sweep:  # the kernel under other launch configurations (the rule's choice is row["triton"])
        rule = decode_config(batch, nkv, ctx, d)
        row["sweep"] = []
        for block_n, warps, splits in {(bn, w, sp) for bn, w in SWEEP for sp in (rule.num_splits, 2 * rule.num_splits)}:
            cfg = DecodeConfig(block_n, min(splits, MAX_SPLITS), warps, 2)
            fn = lambda cfg=cfg: decode_attention(q[:, :, 0], layer.k, layer.v, cache.slots, cache.start,
                                                  layer.k_scale, layer.v_scale, config=cfg)
            t = statistics.median(time_calls(captured(fn, device), device, args.repeats, warmup=2, inner=args.inner))
            row["sweep"].append({"block_n": block_n, "num_warps": warps, "num_splits": cfg.num_splits,
                                 "us_per_layer_step": t * 1e6, "bytes_per_s": needed / t})
        row["sweep"].sort(key=lambda x: x["us_per_layer_step"])
    row["triton_speedup"] = row["sdpa"]["us_per_layer_step"] / row["triton"]["us_per_layer_step"]
    return row


def floor_bytes(config: Any, w: Workload, kv: str, bucket: int) -> int:
    """decode_step_bytes with the KV cache at its stored width (1 byte per element for FP8; weights bf16)."""
    nbytes = decode_step_bytes(config, w, 2, bucket)
    if kv == "fp8":
        ctx = mean_decode_context(w, bucket)
        nbytes -= kv_cache_bytes(config, w.batch_size, ctx, 2) - kv_cache_bytes(config, w.batch_size, ctx, 1)
    return nbytes


def engine_step(model: Any, w: Workload, kv: str, option: str, bandwidth: float, args: argparse.Namespace
                ) -> dict[str, Any]:
    r = run_workload(model, w, graphs=args.graphs, repeats=2, bucket=DEFAULT_BUCKET, kv_dtype=CACHES[kv],
                     decode_attention=option)
    step = r["inter_token_s"]
    out = {"batch": w.batch_size, "prompt": w.prompt_len, "gen": w.gen_len, "cache": kv, "decode_attention": option,
           "graphs": r["graphs"], "ms_per_step": step * 1e3, "output_tokens_per_s": r["output_tokens_per_s"]}
    for label, bucket in (("floor_bucket128", DEFAULT_BUCKET), ("floor_exact", 1)):
        floor = floor_bytes(model.config, w, kv, bucket) / bandwidth
        out[label] = {"bytes": floor_bytes(model.config, w, kv, bucket), "floor_ms": floor * 1e3,
                      "ratio_to_floor": step / floor}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (smoke run)")
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--contexts", default="2048,8192")
    parser.add_argument("--graphs", default="manual",
                        help="engine graph mode for part 2 (manual: captured eager kernels, no compiles; auto = fused)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--inner", type=int, default=20)
    parser.add_argument("--skip-engine", action="store_true", help="only the per-layer kernel timings")
    parser.add_argument("--sweep", action="store_true", help="also time other kernel launch configurations")
    args = parser.parse_args()

    device = torch.device("cpu" if args.tiny else "cuda")
    batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    prompt, gen_len = 128, 128
    if args.tiny:
        config = tiny_llama_config(num_layers=2, num_heads=4, num_kv_heads=2)
        batches, contexts, prompt, gen_len, args.repeats, args.inner = [2], [40], 8, 4, 1, 1
    else:
        config = llama31_8b_config()
    bandwidth = measure_bandwidth(device, nbytes=(1 << 30) if device.type == "cuda" else (16 << 20))
    record: dict[str, Any] = {"benchmark": "decode_attention", **metadata(), "bandwidth_bytes_per_s": bandwidth,
                              "layer": [], "engine": [], "graphs": args.graphs,
                              "auto_picks": {kv: "triton" if resolve("auto", device, kv == "fp8") else "sdpa"
                                             for kv in CACHES}}
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print(f"{'batch':>5} {'ctx':>5} {'cache':>5} {'splits':>6} {'sdpa us':>9} {'triton us':>9} {'x':>5} "
          f"{'sdpa GB/s':>9} {'triton GB/s':>11}")
    for kv in CACHES:
        for b in batches:
            for ctx in contexts:
                r = layer_step(config, b, ctx, kv, device, bandwidth, args)
                record["layer"].append(r)
                print(f"{b:>5} {ctx:>5} {kv:>5} {r['splits']:>6} {r['sdpa']['us_per_layer_step']:>9.1f} "
                      f"{r['triton']['us_per_layer_step']:>9.1f} {r['triton_speedup']:>5.2f} "
                      f"{r['sdpa']['bytes_per_s'] / 1e9:>9.0f} {r['triton']['bytes_per_s'] / 1e9:>11.0f}")
                if args.sweep:
                    best = r["sweep"][0]
                    print(f"      best of the sweep: {best['us_per_layer_step']:.1f} us (block_n {best['block_n']}, "
                          f"{best['num_warps']} warps, {best['num_splits']} splits)")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if not args.skip_engine:
        model = build_model(config, device=device, dtype=torch.bfloat16, seed=0).eval()
        print(f"\nwhole decode step, {config.num_layers} layers, prompt {prompt} + {gen_len}, graphs {args.graphs}")
        print(f"{'batch':>5} {'cache':>5} {'attention':>9} {'ms/step':>8} {'x floor128':>10} {'x exact':>8}")
        for b in batches:
            w = Workload(f"decode-b{b}", b, prompt, gen_len)
            for kv in CACHES:
                for option in ("sdpa", "triton"):
                    r = engine_step(model, w, kv, option, bandwidth, args)
                    record["engine"].append(r)
                    print(f"{b:>5} {kv:>5} {option:>9} {r['ms_per_step']:>8.2f} "
                          f"{r['floor_bucket128']['ratio_to_floor']:>10.2f} {r['floor_exact']['ratio_to_floor']:>8.2f}")
        del model
    write_json(args.out, json.loads(json.dumps(record, default=float)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
