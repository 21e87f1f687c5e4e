"""Prefill against the GPU's compute peak: the runtime's prefill of Llama-3.1-8B's shape at long prompts.

Random weights, bf16. For each BATCHxPROMPT shape: the prefill's time (the median of --repeats timed calls of
`Engine.prefill`, after warm-up), its FLOPs (`puzzle.runtime.bench.prefill_flops`: every matrix product,
causal attention, the LM head on the last position) and the fraction of the datasheet's dense bf16 peak they
reach. Beside it, the same model's matrix products alone through cuBLAS (one layer's q/k/v/o and gate/up/down
GEMMs at the shape's token count, x layers): what the GPU's GEMM library reaches on these shapes, so the gap
between the two is the runtime's own. With --profile, the GPU time per kernel of one prefill, grouped into
GEMM, attention and the rest.

--prefill names the engine's prefill modes to time side by side (`Engine(prefill=...)`: "eager" kernels, or
"compiled" inductor regions that fuse the elementwise kernels between the GEMMs; each compiles once per shape).
Each shape's record holds the shared FLOPs and cuBLAS figures, and under "modes" one row per prefill mode
(time, TFLOP/s, fraction of peak, profile); "compiled_speedup" = eager time / compiled time when both ran.

    python benchmarks/prefill_peak.py --out $OUT/prefill_peak.json                 # one H200, a few minutes
    python benchmarks/prefill_peak.py --out $OUT/prefill_peak.json --prefill compiled   # one mode only
    python benchmarks/prefill_peak.py --tiny --out /tmp/prefill.json              # CPU smoke run (seconds)
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _kernels import kernel_times
from _meta import metadata

from puzzle.core.workloads import Workload
from puzzle.model.blocks import ModelConfig
from puzzle.model.decoder import build_model
from puzzle.model.presets import llama31_8b_config, tiny_llama_config
from puzzle.runtime.bench import prefill_flops
from puzzle.runtime.datasheet import datasheet
from puzzle.runtime.engine import PREFILL_MODES, Engine
from puzzle.runtime.timing import sync

GOAL_FRACTION = 0.60  # issue 18: prefill at >= 60% of the bf16 peak for 8B at 4k tokens


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [(int(b), int(p)) for b, p in (s.split("x") for s in text.split(",") if s)]


def parse_modes(text: str) -> list[str]:
    modes = [m for m in text.split(",") if m]
    bad = [m for m in modes if m not in PREFILL_MODES]
    if bad or not modes:
        raise SystemExit(f"--prefill {text!r}: use a comma list of {', '.join(PREFILL_MODES)}")
    return modes


def median_s(fn: Any, device: torch.device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(in, out) of every matrix product in one parent layer: q, k, v, o, gate, up, down."""
    h, d = cfg.hidden_size, cfg.head_dim
    att, ffn = cfg.blocks[0].attention, cfg.blocks[0].ffn
    i = ffn.intermediate_size
    return [(h, cfg.num_attention_heads * d), (h, att.num_kv_heads * d), (h, att.num_kv_heads * d),
            (cfg.num_attention_heads * d, h), (h, i), (h, i), (i, h)]


@torch.inference_mode()
def cublas_layer_s(cfg: ModelConfig, tokens: int, device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    """One layer's GEMMs at `tokens` rows, back to back through torch.matmul (cuBLAS), median seconds."""
    x = {k: torch.randn(tokens, k, device=device, dtype=dtype) for k in {k for k, _ in gemm_shapes(cfg)}}
    ws = [torch.randn(k, n, device=device, dtype=dtype) / k ** 0.5 for k, n in gemm_shapes(cfg)]

    def run() -> None:
        for (k, _), w in zip(gemm_shapes(cfg), ws, strict=True):
            torch.matmul(x[k], w)

    return median_s(run, device, repeats)


def kernel_groups(engine: Engine, ids: torch.Tensor) -> dict[str, Any]:
    """GPU time of one prefill by kernel, and grouped: GEMM (cuBLAS/cutlass), attention (flash/SDPA), other."""
    dev = ids.device
    engine.prefill(ids)
    sync(dev)
    per = {name: sum(times) for name, times in kernel_times(lambda: engine.prefill(ids), dev).items()}
    groups: dict[str, float] = defaultdict(float)
    for name, us in per.items():
        low = name.lower()
        kind = ("attention" if any(s in low for s in ("flash", "fmha", "attention", "sdpa")) else
                "gemm" if any(s in low for s in ("gemm", "cutlass", "sm90_xmma", "nvjet", "matmul", "mm")) else
                "other")
        groups[kind] += us
    top = sorted(per.items(), key=lambda kv: -kv[1])[:20]
    return {"group_us": dict(groups), "total_us": sum(per.values()),
            "top_kernels": [{"kernel": k[:140], "us": v} for k, v in top]}


def time_mode(model: torch.nn.Module, cfg: ModelConfig, mode: str, b: int, p: int, flops: float,
              peak: float | None, profile: bool, repeats: int) -> dict[str, Any]:
    """One prefill mode at one shape: median time (the warm-up compiles a compiled mode), TFLOP/s, fraction of
    peak, the kernel profile if asked, the first call's time (compile and graph capture included);
    {"error": ...} when it runs out of memory."""
    dev = model.embed_tokens.weight.device
    try:
        engine = Engine(model, b, p + 1, graphs="auto", prefill=mode)
        ids = torch.randint(0, cfg.vocab_size, (b, p), device=dev)
        first_s = median_s(functools.partial(engine.prefill, ids), dev, 1, warmup=0)  # compile + capture
        prefill_s = median_s(functools.partial(engine.prefill, ids), dev, repeats)
        row: dict[str, Any] = {"prefill_s": prefill_s, "tflops_per_s": flops / prefill_s / 1e12,
                               "first_call_s": first_s}
        if peak:
            row["fraction_of_peak"] = flops / prefill_s / peak
        if profile:
            row["profile"] = kernel_groups(engine, ids)
        del engine
    except torch.OutOfMemoryError as e:
        row = {"error": f"out of memory: {str(e)[:160]}"}
    return row


@torch.inference_mode()
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shapes", default="1x4096,2x4096,4x4096,1x1024,1x8192", help="BATCHxPROMPT comma list")
    ap.add_argument("--profile", default="1x4096", help="BATCHxPROMPT shapes to profile per kernel ('' = none)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prefill", default=",".join(PREFILL_MODES), help="prefill modes to time, comma list")
    ap.add_argument("--tiny", action="store_true", help="a tiny model on this machine's device (smoke run)")
    args = ap.parse_args()
    modes = parse_modes(args.prefill)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = tiny_llama_config(num_layers=2, num_kv_heads=2) if args.tiny else llama31_8b_config()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    spec = datasheet(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else None
    peak = spec.peak(str(dtype)) if spec is not None else None
    model = build_model(cfg, device=dev, dtype=dtype, seed=0).eval()
    out: dict[str, Any] = {"meta": metadata(), "benchmark": "prefill_peak", "model": "tiny" if args.tiny else "8b",
                           "dtype": str(dtype), "datasheet": spec.name if spec else None, "peak_flops": peak,
                           "goal_fraction": GOAL_FRACTION, "prefill_modes": modes, "shapes": {}}
    profile_shapes = set(parse_shapes(args.profile))
    for b, p in parse_shapes(args.shapes):
        key = f"{b}x{p}"
        flops = prefill_flops(cfg, Workload(key, b, p, 1))
        try:
            gemm_s = cublas_layer_s(cfg, b * p, dev, dtype, args.repeats) * cfg.num_layers
            gemm_flops = 2.0 * b * p * sum(k * n for k, n in gemm_shapes(cfg)) * cfg.num_layers
            row: dict[str, Any] = {"flops": flops, "cublas_gemms_s": gemm_s,
                                   "cublas_tflops_per_s": gemm_flops / gemm_s / 1e12, "modes": {}}
            if peak:
                row["cublas_fraction_of_peak"] = gemm_flops / gemm_s / peak
        except torch.OutOfMemoryError as e:
            row = {"flops": flops, "cublas_error": f"out of memory: {str(e)[:160]}", "modes": {}}
        for mode in modes:
            row["modes"][mode] = time_mode(model, cfg, mode, b, p, flops, peak, (b, p) in profile_shapes,
                                           args.repeats)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            out["shapes"][key] = row
            args.out.write_text(json.dumps(out, indent=1) + "\n")
        times = {m: r["prefill_s"] for m, r in row["modes"].items() if "prefill_s" in r}
        if "eager" in times and "compiled" in times:
            row["compiled_speedup"] = times["eager"] / times["compiled"]
        out["shapes"][key] = row
        cublas = row.get("cublas_fraction_of_peak")
        for mode, r in row["modes"].items():
            frac = r.get("fraction_of_peak")
            print(f"{key} {mode}: " + (r["error"] if "error" in r else
                  f"prefill {r['prefill_s'] * 1e3:.2f} ms, {r['tflops_per_s']:.0f} TFLOP/s"
                  + (f" = {frac:.1%} of peak" if frac else "")
                  + (f" (cuBLAS GEMMs alone {cublas:.1%})" if frac and cublas else "")), flush=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
