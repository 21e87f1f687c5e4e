"""Timing on the device: every variant of the search space (per `CostsConfig.method`), the fixed costs and the
whole parent (for the calibration), with the runtime's engine and CUDA graphs, as `puzzle eval` times a model.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from puzzle.core.dtypes import FP8, compute_dtype_name, precision_bytes, torch_dtype
from puzzle.core.errors import PuzzleError
from puzzle.core.workloads import Workload
from puzzle.costs.calibration import fit_calibration
from puzzle.costs.consistency import make_consistent, parent_anchors, summary_line
from puzzle.costs.estimate import attention_kv_bytes, variant_record
from puzzle.costs.schema import lookup_variant
from puzzle.model.blocks import AttentionConfig, BlockConfig, FFNConfig, ModelConfig
from puzzle.model.decoder import build_model
from puzzle.runtime.engine import Engine
from puzzle.runtime.fp8 import E4M3, quantize_fp8
from puzzle.runtime.timing import summarize, time_calls

if TYPE_CHECKING:
    from puzzle.costs.stage import CostsConfig


def parent_halves(model: ModelConfig) -> tuple[AttentionConfig, FFNConfig]:
    """The parent's typical sub-blocks: its most common non-no-op attention and FFN (ties: the first layer's).

    A part that is a no-op in every layer is a no-op here too.
    """
    atts = Counter(b.attention for b in model.blocks if b.attention.kind != "no_op")
    ffns = Counter(b.ffn for b in model.blocks if b.ffn.kind != "no_op")
    return (atts.most_common(1)[0][0] if atts else AttentionConfig.no_op(),
            ffns.most_common(1)[0][0] if ffns else FFNConfig.no_op())


def _stack_config(model: ModelConfig, block: BlockConfig, k: int, seq: int, vocab: int = 64) -> ModelConfig:
    return replace(model, vocab_size=vocab, blocks=tuple(block for _ in range(k)),
                   max_position_embeddings=max(model.max_position_embeddings, seq), tie_word_embeddings=False)


def _time_model(config: ModelConfig, w: Workload, ctx: int, cfg: CostsConfig, device: torch.device,
                gen: torch.Generator) -> tuple[list[float], list[float]]:
    """Prefill and decode-step samples (seconds) of a whole model (random weights) with the runtime engine;
    at fp8, with FP8 linears and an FP8 KV cache (`puzzle.runtime.fp8`)."""
    model = build_model(config, device=device, dtype=torch_dtype(compute_dtype_name(cfg.dtype)), seed=0).eval()
    fp8 = cfg.dtype == FP8
    if fp8:
        quantize_fp8(model)
    engine = Engine(model, w.batch_size, max(w.prompt_len, ctx) + 1, graphs=cfg.graphs, bucket=1,
                    kv_dtype=E4M3 if fp8 else None)
    return time_engine(engine, config.vocab_size, w, ctx, cfg, device, gen)


def time_engine(engine: Engine, vocab_size: int, w: Workload, ctx: int, cfg: CostsConfig, device: torch.device,
                gen: torch.Generator) -> tuple[list[float], list[float]]:
    """Prefill and decode-step samples (seconds) of a built engine on random tokens drawn from `gen`."""
    b, p = w.batch_size, w.prompt_len
    prefill, decode = [], []
    for _ in range(cfg.input_sets):
        ids = torch.randint(0, vocab_size, (b, p), generator=gen).to(device)
        prefill += time_calls(lambda: engine.prefill(ids), device, cfg.repeats, cfg.warmup)  # noqa: B023
    for _ in range(cfg.input_sets):
        tok = torch.randint(0, vocab_size, (b,), generator=gen).to(device)
        decode += time_calls(engine.decode_at(ctx, tok), device, cfg.repeats, cfg.warmup, inner=cfg.decode_inner)
    return prefill, decode


# (model config, workload, decode context, cfg, device, generator) -> (prefill samples, decode-step samples) [s]
TimeModel = Callable[[ModelConfig, Workload, int, "CostsConfig", torch.device, torch.Generator],
                     tuple[list[float], list[float]]]


def measure_workload(model: ModelConfig, atts: list[AttentionConfig], ffns: list[FFNConfig], w: Workload,
                     cfg: CostsConfig, ctx: int, device: torch.device, timer: TimeModel | None = None
                     ) -> dict[str, Any]:
    """Time every variant (per `cfg.method`), the fixed costs and, unless `cfg.calibrate` is "none", the parent.

    A variant's per-layer time is (T(stack) - T(reference)) / layers, clamped at 0, where the stack holds the
    variant and the reference the same layers with the variant a no-op ("neighbourhood"), or an empty 1-layer
    model ("isolated"). Each reference is timed once, when the first variant needs it. Variants that break the
    width order beyond their spread are timed again, then fitted (`puzzle.costs.consistency`), before the
    calibration sees them. `timer` times one model (default: `_time_model`, the runtime engine).
    """
    timer = timer or _time_model
    eb = precision_bytes(cfg.dtype)
    gen = torch.Generator().manual_seed(0)
    empty = BlockConfig(AttentionConfig.no_op(), FFNConfig.no_op())
    # per part: the layer a variant is timed in (`around`), and the reference stack (block, layers)
    if cfg.method == "isolated":
        around = {"attention": lambda a: BlockConfig(a, FFNConfig.no_op()),
                  "ffn": lambda f: BlockConfig(AttentionConfig.no_op(), f)}
        refs = {"attention": (empty, 1), "ffn": (empty, 1)}
    else:
        p_att, p_ffn = parent_halves(model)
        around = {"attention": lambda a: BlockConfig(a, p_ffn), "ffn": lambda f: BlockConfig(p_att, f)}
        refs = {"attention": (BlockConfig(AttentionConfig.no_op(), p_ffn), cfg.neighbours),
                "ffn": (BlockConfig(p_att, FFNConfig.no_op()), cfg.neighbours)}
    ref_times: dict[tuple[BlockConfig, int], tuple[float, float] | None] = {}  # None: the reference OOMs

    def reference(part: str) -> tuple[float, float] | None:
        block, n = refs[part]
        if (block, n) not in ref_times:
            try:
                pf, dec = timer(_stack_config(model, block, n, ctx + 1), w, ctx, cfg, device, gen)
                ref_times[block, n] = (statistics.median(pf), statistics.median(dec))
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                ref_times[block, n] = None
                print(f"costs: {w.name}: the {part} reference stack ({n} x {block.name}) does not fit in device "
                      f"memory at batch {w.batch_size}; every {part} variant is recorded as oom")
        return ref_times[block, n]

    def time_variant(part: str, variant: AttentionConfig | FFNConfig, k: int) -> dict[str, float] | None:
        """One variant's per-layer times and spreads (the stack's IQR / k), or None when it does not fit."""
        ref = reference(part)
        if ref is None:
            return None
        try:
            pf, dec = timer(_stack_config(model, around[part](variant), k, ctx + 1), w, ctx, cfg, device, gen)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            print(f"costs: {w.name}: {variant.name} does not fit in device memory at batch {w.batch_size}")
            return None
        spf, sdec = summarize(pf), summarize(dec)
        return {"prefill_s": max(0.0, (spf["median_s"] - ref[0]) / k),
                "decode_step_s": max(0.0, (sdec["median_s"] - ref[1]) / k),
                "prefill_rel_spread": spf["rel_spread"], "decode_rel_spread": sdec["rel_spread"],
                "prefill_spread_s": spf["rel_spread"] * spf["median_s"] / k,
                "decode_spread_s": sdec["rel_spread"] * sdec["median_s"] / k}

    out: dict[str, Any] = {"attention": {}, "ffn": {}}
    spreads: list[float] = []
    timed: dict[tuple[str, str], tuple[AttentionConfig | FFNConfig, int]] = {}
    variants = [("attention", a, BlockConfig(a, FFNConfig.no_op())) for a in atts]
    variants += [("ffn", f, BlockConfig(AttentionConfig.no_op(), f)) for f in ffns]
    for part, variant, alone in tqdm(variants, desc=f"costs: {w.name}", unit="variant"):
        params = model.block_param_count(alone)
        rec = variant_record(params, attention_kv_bytes(alone.attention, model.head_dim, eb))
        out[part][variant.name] = rec
        if params == 0:  # no-op: costs nothing by construction
            rec["prefill_s"] = rec["decode_step_s"] = 0.0
            continue
        if cfg.method == "isolated":
            k = max(1, min(cfg.max_stack, math.ceil(cfg.stack_bytes / (params * eb))))
        else:
            k = cfg.neighbours
        rec["stack"] = k
        result = time_variant(part, variant, k)
        if result is None:
            rec["oom"] = True
            continue
        rec.update(result)
        timed[part, variant.name] = (variant, k)
        spreads += [result["prefill_rel_spread"], result["decode_rel_spread"]]
    out["consistency"] = make_consistent(out, lambda part, name: time_variant(part, *timed[part, name]),
                                         cfg.consistency_remeasure, parent_anchors(model.blocks))
    if line := summary_line(out["consistency"]):
        print(f"costs: {w.name}: {line}")
    # Fixed costs: the real vocabulary with one empty layer (embedding, final norm, LM head), plus sampling.
    fixed_pf, fixed_dec = timer(_stack_config(model, empty, 1, ctx + 1, model.vocab_size), w, ctx, cfg, device, gen)
    logits = torch.randn(w.batch_size, model.vocab_size, device=device)
    sampling = statistics.median(time_calls(lambda: logits.argmax(-1), device, cfg.repeats, cfg.warmup))
    out["fixed"] = {
        "prefill_s": statistics.median(fixed_pf), "decode_step_s": statistics.median(fixed_dec) + sampling,
        "sampling_s": sampling, "params": model.fixed_param_count(),
    }
    out["median_rel_spread"] = statistics.median(spreads) if spreads else 0.0
    if cfg.calibrate != "none":
        out["calibration"] = calibrate(model, out, w, cfg, ctx, device, gen, timer)
    return out


def calibrate(model: ModelConfig, body: dict[str, Any], w: Workload, cfg: CostsConfig, ctx: int,
              device: torch.device, gen: torch.Generator, timer: TimeModel | None = None) -> dict[str, Any]:
    """Time the whole parent like a variant and fit the per-block sums to it (`cfg.calibrate`).

    The sums of per-variant times miss what only a whole model shows (cache effects between different
    layers, launch gaps). One measured model fixes one number per phase; "scale" spreads the difference over
    the blocks in proportion to their time (a child with half the block time gets half the correction),
    "offset" treats it as a fixed cost. Both keep the MIP linear.
    """
    raw = {"attention": body["attention"], "ffn": body["ffn"], "fixed": body["fixed"], "workload": w.to_dict()}
    try:  # the parent's own variants must have been measured (and fit) for the sums to exist
        for b in model.blocks:
            lookup_variant(raw, "attention", b.attention.name), lookup_variant(raw, "ffn", b.ffn.name)
        pf, dec = (timer or _time_model)(model, w, ctx, cfg, device, gen)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"method": "none", "reason": f"the parent does not fit in device memory at batch {w.batch_size}"}
    except PuzzleError as e:
        return {"method": "none", "reason": str(e)}
    spf, sdec = summarize(pf), summarize(dec)
    return fit_calibration(model, raw, cfg.calibrate,
                           {"prefill_s": spf["median_s"], "decode_step_s": sdec["median_s"],
                            "prefill_rel_spread": spf["rel_spread"], "decode_rel_spread": sdec["rel_spread"]})
