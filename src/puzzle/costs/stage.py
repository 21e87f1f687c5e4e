"""Per-sub-block costs on the target device, the analytic fallback, the loader, and `predict`.

`run_costs(run_dir, cfg, search_space_blocks)` writes one file per workload:
`costs/<device>-<workload>.json`, where <device> is e.g. `nvidia-h200` (measured) or `estimate` (analytic).

JSON schema (`"schema": "puzzle-costs/1"`; times in seconds, sizes in bytes):
    kind            "measured" | "estimate"  (an estimate must be labelled as such wherever shown)
    device          device name ("NVIDIA H200", or "estimate (roofline ...)")
    device_key      the <device> part of the file name
    device_memory_bytes   total device memory (estimate: null)
    dtype, torch, created, inputs_hash
    workload        {name, batch_size, prompt_len, gen_len}
    decode_context  cache slots a decode step reads, averaged over the generated tokens
    model           {hidden_size, num_attention_heads, head_dim, vocab_size, num_layers}
    fixed           {prefill_s, decode_step_s, sampling_s, params}: embedding, final norm, LM head, sampling
    attention       {variant name ("gqa8", "linear", "no_op"): VARIANT}
    ffn             {variant name ("swiglu14336", "linear", "no_op"): VARIANT}
      VARIANT = {prefill_s, decode_step_s, params, kv_bytes_per_token, prefill_rel_spread,
                 decode_rel_spread, prefill_spread_s, decode_spread_s, stack, oom}; times are per layer, the
      width-consistent ones (see `consistency`); rel spread = the timed stack's IQR / median, spread_s = that
      IQR per layer (seconds); null times when oom is true;
      stack = layers in the timed stack (0: a no-op, not timed): the N = `neighbours` layers of the
      variant with the parent's other half ("neighbourhood"), or k copies of the variant alone ("isolated")
    timing          {repeats, warmup, input_sets, median_rel_spread} (rel spread = IQR / median)
    graphs          the runtime's decode mode the times were measured with ("fused", "manual", ...; null: estimate)
    method          how the variants were timed (null: estimate):
                    "neighbourhood": N layers of the variant with the parent's most common other half (its
                    typical FFN for an attention variant, its typical attention for an FFN variant), minus the
                    same N layers with the variant a no-op, over N;
                    "isolated": k copies of the variant with a no-op other half, minus a 1-layer empty model, over k
    consistency     {rule, chains {attention: [gqa names, fewer KV heads first], ffn: [swiglu names, narrow
                    first]}, max_remeasure_rounds, raw {part: {name: {prefill_s, decode_step_s, *_rel_spread,
                    *_spread_s}}} (the first measurement), violations [{part, phase, narrow, wide, narrow_s,
                    wide_s, excess_s, spread_s, beyond_spread}] (in the first measurement), remeasured [{round,
                    variants {"part:name": times}}], remaining [violations after re-measuring], adjusted
                    [{part, variant, phase, measured_s, adjusted_s}] (the isotonic fit)}: `puzzle.costs.consistency`;
                    absent in files written before it (the same schema string: the key is an addition)
    calibration     null (estimate) or {method: "scale"|"offset"|"none", parent_measured {prefill_s,
                    decode_step_s, *_rel_spread}, parent_uncalibrated {prefill_s, decode_step_s},
                    prefill_scale, decode_scale, prefill_offset_s, decode_offset_s} or {method: "none", reason}
    roofline        {peak_flops, mem_bandwidth} (estimate only)
    parent_memory   memory model of the parent for this workload + {fits, max_batch_size}
A model's time for the workload is fixed + the sum of its layers' attention and FFN variants, corrected by
the calibration against the whole parent timed the same way (`block_costs`, `fixed_costs`, `predict`); those
read the per-layer times alike whichever `method` produced them.
Costs measured on another device are never used silently: `load_costs` raises unless that device is asked
for by name.
"""

from __future__ import annotations

import datetime
import json
import math
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from puzzle.core.artifacts import hash_json, write_json
from puzzle.model.blocks import (
    AttentionConfig,
    BlockConfig,
    FFNConfig,
    ModelConfig,
    attention_param_count,
    ffn_param_count,
)
from puzzle.core.config import check_device, to_dict
from puzzle.core.errors import PuzzleError
from puzzle.model.memory import max_batch_size, memory_model
from puzzle.runtime.engine import Engine, GraphMode, resolve_graph_mode
from puzzle.core.workloads import DEFAULT_WORKLOADS, Workload

SCHEMA = "puzzle-costs/1"
ESTIMATE_KEY = "estimate"
METHODS = ("neighbourhood", "isolated")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class CostsConfig:
    workloads: list[Workload] = field(default_factory=lambda: list(DEFAULT_WORKLOADS))
    mode: Literal["auto", "measure", "estimate"] = "auto"  # auto: measure on a GPU, estimate without one
    device: str = "cuda"
    dtype: str = "bfloat16"
    repeats: int = 10
    warmup: int = 3
    input_sets: int = 3
    decode_inner: int = 10  # decode steps timed back to back per sample
    # How a variant is timed: "neighbourhood" = in a stack of `neighbours` parent-like layers (the variant
    # with the parent's most common other half) minus that stack with the variant a no-op; "isolated" = a
    # stack of copies of the variant alone (other half a no-op) minus an empty 1-layer model. Neighbourhood
    # costs add up to whole-model times better (benchmarks/cost_additivity.py).
    method: Literal["neighbourhood", "isolated"] = "neighbourhood"
    neighbours: int = 4  # layers of a neighbourhood stack
    stack_bytes: int = 256 << 20  # isolated: stack copies of a variant until weights exceed the L2 ...
    max_stack: int = 8  # ... up to this many
    bucket: int = 128  # the runtime's decode bucket (cache prefix rounding), to match its attended length
    graphs: GraphMode = "auto"  # the runtime's decode mode to measure with (auto = the runtime's default)
    # Correct the per-block sums with the parent timed whole on the device: "scale" multiplies every block's
    # time (the MIP stays linear), "offset" adds the difference to the fixed costs, "none" keeps raw sums.
    calibrate: Literal["scale", "offset", "none"] = "scale"
    # Extra timing rounds for variants that break the width order (fewer KV heads or a narrower FFN timed
    # slower) by more than their spread; what still breaks it after them is fitted (`puzzle.costs.consistency`).
    consistency_remeasure: int = 2
    peak_flops: float = 989e12  # analytic roofline (H100/H200 dense bf16)
    mem_bandwidth: float = 4.8e12  # analytic roofline (H200 HBM3e)

    def __post_init__(self) -> None:
        for name in ("repeats", "input_sets", "decode_inner", "neighbours", "stack_bytes", "max_stack", "bucket",
                     "peak_flops", "mem_bandwidth"):
            if getattr(self, name) <= 0:
                raise PuzzleError(f"costs.{name} must be positive, got {getattr(self, name)}")
        if self.warmup < 0:
            raise PuzzleError(f"costs.warmup must be >= 0, got {self.warmup}")
        if self.consistency_remeasure < 0:
            raise PuzzleError(f"costs.consistency_remeasure must be >= 0, got {self.consistency_remeasure}")
        if self.dtype not in DTYPES:
            raise PuzzleError(f"costs.dtype {self.dtype!r} is not supported; use one of {sorted(DTYPES)}")
        if not self.workloads:
            raise PuzzleError("costs.workloads is empty; name at least one workload, e.g. "
                              "{name: chat, batch_size: 1, prompt_len: 128, gen_len: 128}")
        names = [w.name for w in self.workloads]
        if len(set(names)) != len(names):
            raise PuzzleError(f"costs.workloads names a workload twice ({names}); give each a distinct name")
        check_device("costs.device", self.device)


# ---- variants ----------------------------------------------------------------------------------------


def split_variants(blocks: list[BlockConfig]) -> tuple[list[AttentionConfig], list[FFNConfig]]:
    att = list(dict.fromkeys(b.attention for b in blocks))
    ffn = list(dict.fromkeys(b.ffn for b in blocks))
    return att, ffn


def parent_halves(model: ModelConfig) -> tuple[AttentionConfig, FFNConfig]:
    """The parent's typical sub-blocks: its most common non-no-op attention and FFN (ties: the first layer's).

    A part that is a no-op in every layer is a no-op here too.
    """
    atts = Counter(b.attention for b in model.blocks if b.attention.kind != "no_op")
    ffns = Counter(b.ffn for b in model.blocks if b.ffn.kind != "no_op")
    return (atts.most_common(1)[0][0] if atts else AttentionConfig.no_op(),
            ffns.most_common(1)[0][0] if ffns else FFNConfig.no_op())


def attention_kv_bytes(att: AttentionConfig, head_dim: int, dtype_bytes: int) -> int:
    return 2 * att.num_kv_heads * head_dim * dtype_bytes if att.kind == "gqa" else 0


def mean_decode_context(workload: Workload, bucket: int) -> int:
    """Cache slots a decode step reads, averaged over the workload's decode steps (bucketed like the runtime)."""
    s = workload.max_seq_len
    lengths = [min(s, -(-(workload.prompt_len + i + 1) // bucket) * bucket) for i in range(workload.gen_len - 1)]
    return round(statistics.mean(lengths)) if lengths else workload.prompt_len + 1


def _variant_record(params: int, kv: int) -> dict[str, Any]:
    return {"prefill_s": None, "decode_step_s": None, "params": params, "kv_bytes_per_token": kv,
            "prefill_rel_spread": 0.0, "decode_rel_spread": 0.0, "prefill_spread_s": 0.0, "decode_spread_s": 0.0,
            "stack": 0, "oom": False}


# ---- analytic fallback -----------------------------------------------------------------------------


def _roofline(flops: float, nbytes: float, cfg: CostsConfig) -> float:
    return max(flops / cfg.peak_flops, nbytes / cfg.mem_bandwidth)


def estimate_workload(model: ModelConfig, atts: list[AttentionConfig], ffns: list[FFNConfig], w: Workload,
                      cfg: CostsConfig, ctx: int) -> dict[str, Any]:
    """FLOPs and bytes of each variant against the roofline (peak_flops, mem_bandwidth): an estimate."""
    eb = DTYPES[cfg.dtype].itemsize
    h, d, nq, b, p = model.hidden_size, model.head_dim, model.num_attention_heads, w.batch_size, w.prompt_len
    act = lambda tokens: 4 * tokens * h * eb  # read + write of a few hidden-sized tensors
    out: dict[str, Any] = {"attention": {}, "ffn": {}}
    for att in atts:
        params = attention_param_count(att, h, d, nq, model.attention_bias)
        kv = attention_kv_bytes(att, d, eb)
        rec = _variant_record(params, kv)
        if att.kind != "no_op":
            attn_pf = 2 * b * nq * d * p * p if att.kind == "gqa" else 0  # causal QK^T + PV
            rec["prefill_s"] = _roofline(2 * params * b * p + attn_pf, params * eb + act(b * p) + b * p * kv, cfg)
            rec["decode_step_s"] = _roofline(2 * params * b + 4 * b * nq * d * ctx,
                                             params * eb + act(b) + b * ctx * kv, cfg)
        else:
            rec["prefill_s"] = rec["decode_step_s"] = 0.0
        out["attention"][att.name] = rec
    for ffn in ffns:
        params = ffn_param_count(ffn, h)
        rec = _variant_record(params, 0)
        if ffn.kind != "no_op":
            rec["prefill_s"] = _roofline(2 * params * b * p, params * eb + act(b * p), cfg)
            rec["decode_step_s"] = _roofline(2 * params * b, params * eb + act(b), cfg)
        else:
            rec["prefill_s"] = rec["decode_step_s"] = 0.0
        out["ffn"][ffn.name] = rec
    head = model.vocab_size * h
    out["fixed"] = {
        "prefill_s": _roofline(2 * head * b, head * eb + act(b * p), cfg),  # LM head on the last token only
        "decode_step_s": _roofline(2 * head * b, head * eb + b * model.vocab_size * 4, cfg),
        "sampling_s": 0.0, "params": model.param_count() - sum(model.block_param_count(x) for x in model.blocks),
    }
    return out


# ---- measurement (the runtime's kernels and CUDA graphs) -----------------------------------------------


def _stack_config(model: ModelConfig, block: BlockConfig, k: int, seq: int, vocab: int = 64) -> ModelConfig:
    return replace(model, vocab_size=vocab, blocks=tuple(block for _ in range(k)),
                   max_position_embeddings=max(model.max_position_embeddings, seq), tie_word_embeddings=False)


def decode_at(engine: Engine, ctx: int, tokens: torch.Tensor) -> Callable[[], None]:
    """A repeatable decode step of `engine` that reads `ctx` filled cache slots, as at a workload's mean
    context: each call rewrites slot ctx - 1 from `tokens` [B] and attends over slots [0, ctx)."""
    engine.valid.fill_(True)

    def step() -> None:
        engine.length = ctx - 1
        engine.decode(tokens)

    return step


def _time_model(config: ModelConfig, w: Workload, ctx: int, cfg: CostsConfig, device: torch.device,
                gen: torch.Generator) -> tuple[list[float], list[float]]:
    """Prefill and decode-step samples (seconds) of a whole model (random weights) with the runtime engine."""
    from puzzle.model.decoder import build_model
    from puzzle.runtime.timing import time_calls

    model = build_model(config, device=device, dtype=DTYPES[cfg.dtype], seed=0).eval()
    b, p = w.batch_size, w.prompt_len
    engine = Engine(model, b, max(p, ctx) + 1, graphs=cfg.graphs, bucket=1)
    prefill, decode = [], []
    for _ in range(cfg.input_sets):
        ids = torch.randint(0, config.vocab_size, (b, p), generator=gen).to(device)
        prefill += time_calls(lambda: engine.prefill(ids), device, cfg.repeats, cfg.warmup)  # noqa: B023
    for _ in range(cfg.input_sets):
        tok = torch.randint(0, config.vocab_size, (b,), generator=gen).to(device)
        decode += time_calls(decode_at(engine, ctx, tok), device, cfg.repeats, cfg.warmup, inner=cfg.decode_inner)
    return prefill, decode


# (model config, workload, decode context, cfg, device, generator) -> (prefill samples, decode-step samples) [s]
TimeModel = Callable[[ModelConfig, Workload, int, CostsConfig, torch.device, torch.Generator],
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
    from puzzle.costs.consistency import make_consistent, parent_anchors, summary_line
    from puzzle.runtime.timing import summarize

    timer = timer or _time_model
    eb = DTYPES[cfg.dtype].itemsize
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
    for part, variant, alone in variants:
        params = model.block_param_count(alone)
        rec = _variant_record(params, attention_kv_bytes(alone.attention, model.head_dim, eb))
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
    from puzzle.runtime.timing import time_calls
    sampling = statistics.median(time_calls(lambda: logits.argmax(-1), device, cfg.repeats, cfg.warmup))
    out["fixed"] = {
        "prefill_s": statistics.median(fixed_pf), "decode_step_s": statistics.median(fixed_dec) + sampling,
        "sampling_s": sampling, "params": model.param_count() - sum(model.block_param_count(x) for x in model.blocks),
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
    from puzzle.runtime.timing import summarize

    raw = {"attention": body["attention"], "ffn": body["ffn"], "fixed": body["fixed"], "workload": w.to_dict()}
    try:  # the parent's own variants must have been measured (and fit) for the sums to exist
        for b in model.blocks:
            _variant(raw, "attention", b.attention.name), _variant(raw, "ffn", b.ffn.name)
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


def fit_calibration(model: ModelConfig, costs: dict[str, Any], method: str, parent_measured: dict[str, float]
                    ) -> dict[str, Any]:
    """The calibration section from the parent's measured prefill and decode step and the per-variant costs."""
    parts = [(_variant(costs, "attention", b.attention.name), _variant(costs, "ffn", b.ffn.name))
             for b in model.blocks]
    fixed = costs["fixed"]
    blocks_pf = sum(a["prefill_s"] + f["prefill_s"] for a, f in parts)
    blocks_dec = sum(a["decode_step_s"] + f["decode_step_s"] for a, f in parts)
    out: dict[str, Any] = {
        "method": method, "parent_measured": dict(parent_measured),
        "parent_uncalibrated": {"prefill_s": fixed["prefill_s"] + blocks_pf,
                                "decode_step_s": fixed["decode_step_s"] + blocks_dec},
    }
    for phase, blocks in (("prefill", blocks_pf), ("decode", blocks_dec)):
        key = "prefill_s" if phase == "prefill" else "decode_step_s"
        measured = out["parent_measured"][key]
        out[f"{phase}_offset_s"] = measured - out["parent_uncalibrated"][key]
        out[f"{phase}_scale"] = (measured - fixed[key]) / blocks if blocks > 0 else 1.0
    return out


# ---- the stage ---------------------------------------------------------------------------------------


def resolve_mode(cfg: CostsConfig) -> tuple[str, torch.device | None]:
    if cfg.dtype not in DTYPES:
        raise PuzzleError(f"costs.dtype {cfg.dtype!r} is not supported; use one of {sorted(DTYPES)}")
    if cfg.method not in METHODS:
        raise PuzzleError(f"costs.method {cfg.method!r} is not supported; use one of {list(METHODS)}")
    if cfg.neighbours < 1:
        raise PuzzleError(f"costs.neighbours must be at least 1, got {cfg.neighbours}")
    if cfg.mode == "estimate" or (cfg.mode == "auto" and not torch.cuda.is_available()):
        return "estimate", None
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PuzzleError("costs.mode=measure needs a CUDA GPU here; use costs.mode=estimate (analytic) or "
                          "costs.device=cpu")
    return "measured", device


def costs_for_workload(model: ModelConfig, blocks: list[BlockConfig], w: Workload, cfg: CostsConfig,
                       timer: TimeModel | None = None) -> dict[str, Any]:
    """One workload's costs file (without inputs_hash); `timer` replaces the engine timing (tests)."""
    from puzzle.costs.consistency import make_consistent, parent_anchors
    from puzzle.runtime.timing import device_key, device_name

    kind, device = resolve_mode(cfg)
    atts, ffns = split_variants(blocks)
    ctx = mean_decode_context(w, cfg.bucket)
    eb = DTYPES[cfg.dtype].itemsize
    mem = memory_model(model, w, eb)
    if kind == "estimate":
        body = estimate_workload(model, atts, ffns, w, cfg, ctx)
        body["consistency"] = make_consistent(body, anchors=parent_anchors(model.blocks))  # monotone: no fit
        name = f"estimate (roofline {cfg.peak_flops / 1e12:.0f} TFLOP/s, {cfg.mem_bandwidth / 1e12:.2f} TB/s)"
        key, total = ESTIMATE_KEY, None
    else:
        body = measure_workload(model, atts, ffns, w, cfg, ctx, device, timer)
        name, key = device_name(device), device_key(device)
        total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    spread = body.pop("median_rel_spread", None)
    body.setdefault("calibration", None)
    if total is not None:
        mem["fits"] = mem["total_bytes"] <= total
        mem["max_batch_size"] = max_batch_size(model, w.prompt_len, w.gen_len, total, eb)
    return {
        "schema": SCHEMA, "kind": kind, "device": name, "device_key": key, "device_memory_bytes": total,
        "dtype": cfg.dtype, "torch": torch.__version__,
        "graphs": resolve_graph_mode(cfg.graphs, device) if device is not None else None,
        "method": cfg.method if kind == "measured" else None,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "workload": w.to_dict(), "decode_context": ctx,
        "model": {"hidden_size": model.hidden_size, "num_attention_heads": model.num_attention_heads,
                  "head_dim": model.head_dim, "vocab_size": model.vocab_size, "num_layers": model.num_layers},
        **body,
        "timing": {"repeats": cfg.repeats, "warmup": cfg.warmup, "input_sets": cfg.input_sets,
                   "median_rel_spread": spread},
        "roofline": {"peak_flops": cfg.peak_flops, "mem_bandwidth": cfg.mem_bandwidth} if kind == "estimate" else None,
        "parent_memory": mem,
    }


def _default_blocks(run_dir: Path, model: ModelConfig) -> list[BlockConfig]:
    library_dir = run_dir / "library"
    if not library_dir.exists():
        return list(model.blocks)
    from puzzle.stages.library.store import Library  # engineer B's library

    lib = Library.open(library_dir)
    return [b for i in range(model.num_layers) for b in lib.candidates(i)] + list(model.blocks)


def run_costs(run_dir: Path, cfg: CostsConfig, search_space_blocks: list[BlockConfig] | None = None,
              model_config: ModelConfig | None = None) -> dict[str, Path]:
    """Write costs/<device>-<workload>.json for every workload; a current file is kept (resumable)."""
    run_dir = Path(run_dir)
    if model_config is None:
        from puzzle.formats import load_model_config

        if not (run_dir / "parent").exists():
            raise PuzzleError(f"{run_dir / 'parent'} does not exist; run `puzzle import` first")
        model_config = load_model_config(run_dir / "parent")
    blocks = list(search_space_blocks) if search_space_blocks is not None else _default_blocks(run_dir, model_config)
    if not blocks:
        raise PuzzleError("costs: the search space has no blocks; build the library first")
    if not cfg.workloads:
        raise PuzzleError("costs.workloads is empty; name at least one workload")
    kind, device = resolve_mode(cfg)
    from puzzle.runtime.timing import device_key

    key = ESTIMATE_KEY if kind == "estimate" else device_key(device)
    written: dict[str, Path] = {}
    from puzzle.core.notices import clear_warnings

    clear_warnings(run_dir, "costs")  # kept files warn again below
    for w in cfg.workloads:
        path = run_dir / "costs" / f"{key}-{w.name}.json"
        inputs = hash_json({"model": model_config.to_dict(), "blocks": [b.to_dict() for b in blocks],
                            "cfg": to_dict(cfg), "workload": w.to_dict(), "kind": kind})
        written[w.name] = path
        try:
            kept = read_costs_file(path) if path.exists() else None
        except PuzzleError as e:  # a damaged file is measured again, not trusted and not skipped
            print(f"costs: {e.args[0].split(';')[0]}; measuring it again")
            kept = None
        if kept is not None and kept.get("inputs_hash") == inputs:
            _warn_uncalibrated(run_dir, path, kept)
            continue
        data = costs_for_workload(model_config, blocks, w, cfg)
        data["inputs_hash"] = inputs
        write_json(path, data)
        label = " (ESTIMATE)" if kind == "estimate" else ""
        print(f"costs: wrote {path}{label}")
        _warn_uncalibrated(run_dir, path, data)
    return written


def _warn_uncalibrated(run_dir: Path, path: Path, data: dict[str, Any]) -> None:
    """A measured file whose parent could not be timed predicts with raw per-block sums: say so in the run."""
    from puzzle.core.notices import warn

    cal = data.get("calibration") or {}
    if cal.get("method") == "none" and cal.get("reason"):
        warn(run_dir, "costs", f"{path.name}: not calibrated against the whole parent ({cal['reason']}); "
                               "predictions use the raw per-block sums")


# ---- loading and prediction -----------------------------------------------------------------------------


def current_device_key() -> str:
    from puzzle.runtime.timing import device_key

    return device_key("cuda") if torch.cuda.is_available() else ESTIMATE_KEY


def read_costs_file(path: Path) -> dict[str, Any]:
    """One costs file, checked enough to be used; a damaged one is a one-line error naming it and the fix."""
    fix = "delete it and rerun `puzzle costs`"
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise PuzzleError(f"{path} is not a valid costs file ({e.msg} at line {e.lineno}); {fix}") from None
    except UnicodeDecodeError:
        raise PuzzleError(f"{path} is not a valid costs file (not UTF-8 text); {fix}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise PuzzleError(f"{path} is not a valid costs file (schema is not {SCHEMA}); {fix}")
    missing = [k for k in ("workload", "attention", "ffn", "fixed") if not isinstance(data.get(k), dict)]
    missing += [] if isinstance(data.get("device_key"), str) else ["device_key"]
    if missing:
        raise PuzzleError(f"{path} is not a valid costs file (no {', '.join(missing)}); {fix}")
    return data


def load_costs(costs_dir: Path, workload: str, device: str | None = None) -> dict[str, Any]:
    """Costs of `workload` for `device` (a device key such as 'nvidia-h200', or 'estimate').

    device None means this machine's device ('estimate' without a GPU). Costs of another device are used
    only when that device is named explicitly, never silently.
    """
    costs_dir = Path(costs_dir)
    if (costs_dir / "costs").is_dir():
        costs_dir = costs_dir / "costs"
    explicit = device is not None
    device = device or current_device_key()
    path = costs_dir / f"{device}-{workload}.json"
    if not path.exists():
        others = sorted(p.name[: -len(f"-{workload}.json")] for p in costs_dir.glob(f"*-{workload}.json"))
        if others and not explicit:
            raise PuzzleError(
                f"costs for workload {workload!r} were made on {others}, not on this device ({device}); rerun "
                f"`puzzle costs` here, or name the target device explicitly (e.g. device={others[0]!r})"
            )
        raise PuzzleError(f"no costs for workload {workload!r} on {device} in {costs_dir}; run `puzzle costs` first")
    data = read_costs_file(path)
    if data.get("device_key") != device:
        raise PuzzleError(f"{path} holds costs of {data.get('device_key')!r}, not {device!r}; rerun `puzzle costs`")
    return data


def _variant(costs: dict[str, Any], part: str, name: str) -> dict[str, Any]:
    rec = costs[part].get(name)
    if rec is None:
        if name == "no_op":
            return {"prefill_s": 0.0, "decode_step_s": 0.0, "params": 0, "kv_bytes_per_token": 0}
        raise PuzzleError(f"costs have no {part} variant {name!r} (known: {sorted(costs[part])}); rerun "
                          "`puzzle costs` with this block in the search space")
    if rec.get("oom") or rec.get("decode_step_s") is None:
        raise PuzzleError(f"{part} variant {name!r} did not fit in device memory for workload "
                          f"{costs['workload']['name']!r}; lower the batch size")
    return rec


def _correction(costs: dict[str, Any]) -> tuple[str, dict[str, float]]:
    cal = costs.get("calibration") or {}
    method = cal.get("method", "none")
    if method == "scale":
        return method, {"prefill_s": cal["prefill_scale"], "decode_step_s": cal["decode_scale"]}
    if method == "offset":
        return method, {"prefill_s": cal["prefill_offset_s"], "decode_step_s": cal["decode_offset_s"]}
    return "none", {}


def workload_time(prefill_s: float, decode_step_s: float, w: Workload) -> float:
    """A part's time over the workload: its prefill share (first token) + gen_len - 1 decode steps."""
    return prefill_s + (w.gen_len - 1) * decode_step_s


def block_costs(costs: dict[str, Any], block: BlockConfig, workload: Workload | None = None) -> dict[str, float]:
    """One layer's (calibrated) costs: prefill_s, decode_step_s, total_s (over the workload), params, KV bytes.

    The one place that turns a costs JSON into a block's time; `predict` and the search's `CostTable` use it.
    """
    w = workload or Workload(**costs["workload"])
    a, f = _variant(costs, "attention", block.attention.name), _variant(costs, "ffn", block.ffn.name)
    method, corr = _correction(costs)
    out = {key: a[key] + f[key] for key in ("prefill_s", "decode_step_s")}
    if method == "scale":
        out = {key: value * corr[key] for key, value in out.items()}
    out["total_s"] = workload_time(out["prefill_s"], out["decode_step_s"], w)
    out["params"] = a["params"] + f["params"]
    out["kv_bytes_per_token"] = a.get("kv_bytes_per_token", 0) + f.get("kv_bytes_per_token", 0)
    return out


def fixed_costs(costs: dict[str, Any], workload: Workload | None = None) -> dict[str, float]:
    """Embedding, final norm, LM head and sampling (+ an "offset" calibration): prefill_s, decode_step_s, total_s."""
    w = workload or Workload(**costs["workload"])
    fixed = costs["fixed"]
    method, corr = _correction(costs)
    out = {key: float(fixed.get(key, 0.0)) + (corr[key] if method == "offset" else 0.0)
           for key in ("prefill_s", "decode_step_s")}
    out["total_s"] = workload_time(out["prefill_s"], out["decode_step_s"], w)
    out["params"] = int(fixed.get("params", 0))
    return out


def predict(model: ModelConfig | list[BlockConfig] | tuple[BlockConfig, ...], costs: dict[str, Any],
            workload: Workload | None = None) -> dict[str, Any]:
    """Predicted prefill, decode and total time and throughput of a model from per-block costs.

    The first token comes from the prefill; the other gen_len - 1 come from decode steps.
    """
    blocks = model.blocks if isinstance(model, ModelConfig) else tuple(model)
    w = workload or Workload(**costs["workload"])
    fixed = fixed_costs(costs, w)
    prefill, step = fixed["prefill_s"], fixed["decode_step_s"]
    kv_per_token = 0
    for b in blocks:
        c = block_costs(costs, b, w)
        prefill += c["prefill_s"]
        step += c["decode_step_s"]
        kv_per_token += c["kv_bytes_per_token"]
    total = workload_time(prefill, step, w)
    return {
        "kind": costs["kind"], "device": costs["device"], "workload": w.name, "graphs": costs.get("graphs"),
        "calibration": _correction(costs)[0],
        "prefill_s": prefill, "decode_step_s": step, "decode_s": total - prefill, "total_s": total,
        "output_tokens_per_s": w.batch_size * w.gen_len / total,
        "total_tokens_per_s": w.batch_size * (w.prompt_len + w.gen_len) / total,
        "kv_cache_bytes": kv_per_token * w.batch_size * w.max_seq_len,
    }
