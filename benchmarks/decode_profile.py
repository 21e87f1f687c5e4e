"""Where the decode step's time goes: inter-token latency per runtime variant, and a per-kernel profile.

Llama-3.1-8B shape, random weights, bf16, prompt 128 + 128 generated tokens, greedy. For each variant (the
runtime with fused or separate projection GEMVs, under inductor settings) it records the inter-token
latency at each batch size, the ratio to the memory-bandwidth floor at batch 1, and at batch 1 the GPU time
of every kernel in one decode step (torch.profiler over eager calls of the step, graphs off) next to the
captured step's time, so the launch gaps show. Run it with another `PYTHONPATH` to profile older code.

    python benchmarks/decode_profile.py --out /tmp/profile.json [--variants unfused,fused,fused-cdt]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _kernels import kernel_times
from _meta import metadata

from puzzle.core.workloads import Workload
from puzzle.model.decoder import build_model
from puzzle.model.presets import llama31_8b_config, tiny_llama_config
from puzzle.runtime import subblocks
from puzzle.runtime.bench import decode_step_bytes, roofline
from puzzle.runtime.datasheet import datasheet
from puzzle.runtime.engine import Engine
from puzzle.runtime.timing import measure_bandwidth, sync

PROMPT, GEN = 128, 128


def set_variant(name: str) -> dict[str, Any]:
    """Inductor settings of a variant (fresh compiles); returns the Engine keyword arguments."""
    import torch._inductor.config as ic

    torch._dynamo.reset()
    getattr(subblocks, "_COMPILED", {}).clear()
    ic.coordinate_descent_tuning = "cdt" in name
    ic.max_autotune = "autotune" in name
    kwargs: dict[str, Any] = {}
    params = inspect.signature(Engine.__init__).parameters
    if "fuse" in params:
        kwargs["fuse"] = name.startswith("fused")
    if "decode_attention" in params:  # "-triton": the Triton decode kernel over the cache, else the default
        kwargs["decode_attention"] = "triton" if "-triton" in name else "auto"
    return kwargs


def sdpa_backend(name: str) -> contextlib.AbstractContextManager[None]:
    """The SDPA backend a variant forces ("-eff", "-math", "-cudnn" in its name); none: SDPA's own choice."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for tag, backend in (("eff", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH),
                         ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        if f"-{tag}" in name:
            return sdpa_kernel([backend])
    return contextlib.nullcontext()


@torch.inference_mode()
def inter_token_s(model: torch.nn.Module, batch: int, kwargs: dict[str, Any], repeats: int = 3) -> float:
    """Best-of-`repeats` mean decode-step wall time over GEN-1 steps (host never waits: argmax stays on GPU)."""
    dev = model.embed_tokens.weight.device
    ids = torch.randint(0, model.config.vocab_size, (batch, PROMPT), device=dev)
    engine = Engine(model, batch, PROMPT + GEN, **kwargs)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run captures the graphs
        tok = engine.prefill(ids).argmax(-1)
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(GEN - 1):
            tok = engine.decode(tok).argmax(-1)
        sync(dev)
        best = min(best, (time.perf_counter() - t0) / (GEN - 1))
    return best


def release(dev: torch.device) -> None:
    """Free the last engine's cache and graph pool before the next one: an engine's captured graphs refer back to
    it (a reference cycle), so without a collection two large caches would be held at once."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def engine_at_context(model: torch.nn.Module, batch: int, context: int,
                      kwargs: dict[str, Any]) -> tuple[Engine, Callable[[], None]]:
    """An engine whose decode steps read `context` cache slots, and its repeatable step, without a prefill of
    batch x context tokens (whose activations would not fit at 256 x 2k): a 16-token prefill, then
    `Engine.decode_at`, as the costs stage times a workload's mean context. The cache values do not change the
    time."""
    dev = model.embed_tokens.weight.device
    engine = Engine(model, batch, context + 8, **kwargs)
    engine.prefill(torch.randint(0, model.config.vocab_size, (batch, 16), device=dev))
    step = engine.decode_at(context, torch.zeros(batch, dtype=torch.long, device=dev))
    engine.length = context - 1  # where each step() starts: for a caller that runs the step body itself
    return engine, step


@torch.inference_mode()
def inter_token_at_context_s(model: torch.nn.Module, batch: int, context: int, kwargs: dict[str, Any],
                             steps: int = 20, repeats: int = 3) -> float:
    """Best-of-`repeats` mean wall time of a decode step (graph replay) reading `context` cached tokens."""
    engine, step = engine_at_context(model, batch, context, kwargs)
    for _ in range(3):
        step()
    best = float("inf")
    for _ in range(repeats):
        sync(engine.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(engine.device)
        best = min(best, (time.perf_counter() - t0) / steps)
    return best


@torch.inference_mode()
def kernel_profile(model: torch.nn.Module, kwargs: dict[str, Any], batch: int = 1, context: int = PROMPT,
                   steps: int = 5) -> list[dict[str, Any]]:
    """GPU microseconds per decode step of each kernel at `batch` streams of `context` cached tokens (eager calls
    of the step: regions compiled, no graph)."""
    dev = model.embed_tokens.weight.device
    engine, _ = engine_at_context(model, batch, context, kwargs)
    n = engine.attend_len(engine.length)
    engine.slot.fill_(engine.length)
    engine.cache.set_slots(engine.slot, attend_len=n)
    for _ in range(3):
        engine._step(n)
    sync(dev)
    per = kernel_times(lambda: engine._step(n), dev, steps)
    rows = [{"kernel": k[:140], "calls_per_step": len(v) / steps, "us_per_step": sum(v) / steps}
            for k, v in per.items()]
    return sorted(rows, key=lambda r: -r["us_per_step"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", default="unfused,fused")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--profile", default="1x128",
                    help="per-kernel profiles, BATCHxCONTEXT comma list (e.g. 1x128,64x2048,256x2048)")
    ap.add_argument("--itl", default="", help="decode steps at a cached context, BATCHxCONTEXT comma list, each "
                    "against its roofline (e.g. 64x2048,256x2048,64x8192)")
    ap.add_argument("--label", default="", help="e.g. the code's commit, when profiling older code")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip variants once this much time has passed")
    ap.add_argument("--tiny", action="store_true", help="tiny model on this machine's device (smoke test)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = tiny_llama_config(num_layers=2, num_kv_heads=2) if args.tiny else llama31_8b_config()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = build_model(cfg, device=dev, dtype=dtype, seed=0).eval()
    bw = measure_bandwidth(dev, nbytes=(1 << 30) if dev.type == "cuda" else (64 << 20))
    floor = decode_step_bytes(cfg, Workload("b1", 1, PROMPT, GEN), dtype.itemsize) / bw
    out: dict[str, Any] = {"meta": metadata(), "benchmark": "decode_profile", "label": args.label,
                           "bandwidth_bytes_per_s": bw, "floor_s_batch1": floor, "variants": {}}
    stack = contextlib.ExitStack()
    for name in args.variants.split(","):
        if time.perf_counter() - t_start > args.budget_s:
            out["variants"][name] = {"skipped": "time budget"}
            continue
        t0 = time.perf_counter()
        res: dict[str, Any] = {}
        try:
            kwargs = set_variant(name)
            stack.enter_context(sdpa_backend(name))
            res = {"itl_s": {}}
            for b in (int(x) for x in args.batches.split(",")):
                res["itl_s"][b] = inter_token_s(model, b, kwargs)
                print(name, "batch", b, f"{res['itl_s'][b] * 1e3:.3f} ms", flush=True)
            if 1 in res["itl_s"]:
                res["floor_ratio_batch1"] = res["itl_s"][1] / floor
            spec = datasheet(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else None
            res["at_context"] = {}
            for shape in filter(None, args.itl.split(",")):
                b, ctx = (int(x) for x in shape.split("x"))
                try:
                    step_s = inter_token_at_context_s(model, b, ctx, kwargs)
                except torch.OutOfMemoryError as e:
                    res["at_context"][shape] = {"error": f"out of memory: {str(e)[:120]}"}
                    release(dev)
                    continue
                floors = roofline(cfg, Workload("c", b, ctx, 1), step_s, bw, dtype.itemsize, spec=spec)
                res["at_context"][shape] = {"step_s": step_s, "roofline": floors}
                print(f"{name} batch {b} context {ctx}: step {step_s * 1e3:.3f} ms, {floors['ratio_to_floor']:.2f}x "
                      f"the memory floor at the measured bandwidth", flush=True)
                release(dev)
            res["profiles"] = {}
            for shape in filter(None, args.profile.split(",")):
                b, ctx = (int(x) for x in shape.split("x"))
                kernels = kernel_profile(model, kwargs, b, ctx)
                release(dev)
                total = sum(r["us_per_step"] for r in kernels)
                floors = roofline(cfg, Workload("p", b, ctx, 1), total / 1e6, bw, dtype.itemsize, spec=spec)
                res["profiles"][shape] = {"kernels": kernels, "kernel_sum_us": total, "roofline": floors}
                print(f"{name} profile batch {b} context {ctx}: kernel sum {total:.0f} us, memory floor "
                      f"{floors['floor_s'] * 1e6:.0f} us at the measured bandwidth, compute floor "
                      f"{(floors['compute_floor_s'] or 0) * 1e6:.0f} us, binds {floors['binds']}")
                for r in kernels[:15]:
                    print(f"  {r['us_per_step']:9.1f} us  x{r['calls_per_step']:5.1f}  {r['kernel'][:100]}")
            if "1x128" in res["profiles"]:  # the earlier files' keys
                res["kernels"] = res["profiles"]["1x128"]["kernels"]
                res["kernel_sum_us"] = res["profiles"]["1x128"]["kernel_sum_us"]
        except Exception as e:  # noqa: BLE001  record the failure and go on with the other variants
            res = {**res, "error": f"{type(e).__name__}: {e}"[:800]}  # keep what finished
            print(name, res, flush=True)
        stack.close()
        res["wall_s"] = time.perf_counter() - t0
        out["variants"][name] = res
        Path(args.out).write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"floor {floor * 1e3:.3f} ms at {bw / 1e12:.2f} TB/s; wrote {args.out}")


if __name__ == "__main__":
    main()
