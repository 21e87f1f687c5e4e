"""The analytic fallback: each variant's FLOPs and bytes against a roofline (peak FLOP/s, memory bandwidth),
and what every costs file is built from whether measured or estimated (the variants of the search space, a
variant's record, its KV bytes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from puzzle.core.dtypes import compute_dtype_name, dtype_bytes, precision_bytes
from puzzle.core.workloads import Workload
from puzzle.costs.sharding import (
    allreduce_s,
    is_row_parallel,
    rank_attention_params,
    rank_ffn_params,
    rank_kv,
)
from puzzle.model.blocks import (
    AttentionConfig,
    BlockConfig,
    FFNConfig,
    ModelConfig,
    attention_param_count,
    ffn_param_count,
)
from puzzle.model.kinds import ffn_kind

if TYPE_CHECKING:
    from puzzle.costs.stage import CostsConfig


def split_variants(blocks: list[BlockConfig]) -> tuple[list[AttentionConfig], list[FFNConfig]]:
    """The distinct attention and FFN variants of `blocks`, in first-seen order."""
    att = list(dict.fromkeys(b.attention for b in blocks))
    ffn = list(dict.fromkeys(b.ffn for b in blocks))
    return att, ffn


def attention_kv_bytes(att: AttentionConfig, head_dim: int, elem_bytes: int) -> int:
    """K + V bytes one token adds to the cache of an attention variant."""
    return 2 * att.num_kv_heads * head_dim * elem_bytes if att.kind == "gqa" else 0


def variant_record(params: int, kv: int) -> dict[str, Any]:
    """A variant's entry in a costs file before it is timed or estimated (the schema: `puzzle.costs.schema`)."""
    return {"prefill_s": None, "decode_step_s": None, "params": params, "kv_bytes_per_token": kv,
            "prefill_rel_spread": 0.0, "decode_rel_spread": 0.0, "prefill_spread_s": 0.0, "decode_spread_s": 0.0,
            "stack": 0, "oom": False}


def _roofline(flops: float, nbytes: float, cfg: CostsConfig) -> float:
    return max(flops / cfg.peak_flops, nbytes / cfg.mem_bandwidth)


def estimate_workload(model: ModelConfig, atts: list[AttentionConfig], ffns: list[FFNConfig], w: Workload,
                      cfg: CostsConfig, ctx: int) -> dict[str, Any]:
    """FLOPs and bytes of each variant against the roofline (peak_flops, mem_bandwidth): an estimate.

    Weights and KV at the precision's bytes (fp8: 1), activations and the LM head at its compute dtype's.
    A tensor-parallel workload (`w.tensor_parallel` = n > 1) prices one GPU: its share of each variant's
    weights, query heads and KV (`puzzle.costs.sharding`), plus one all-reduce of the hidden state per split
    sub-block over a datasheet NVLink; the records keep the whole variant's params and KV bytes.
    """
    n = w.tensor_parallel
    eb = precision_bytes(cfg.dtype)
    ab = dtype_bytes(compute_dtype_name(cfg.dtype))  # activations, embeddings, LM head
    h, d, nq, b, p = model.hidden_size, model.head_dim, model.num_attention_heads // n, w.batch_size, w.prompt_len
    act = lambda tokens: 4 * tokens * h * ab  # read + write of a few hidden-sized tensors
    reduce = lambda part, tokens: allreduce_s(tokens * h * ab, n) if is_row_parallel(part) else 0.0
    out: dict[str, Any] = {"attention": {}, "ffn": {}}
    for att in atts:
        params = attention_param_count(att, h, d, model.num_attention_heads, model.attention_bias)
        kv = attention_kv_bytes(att, d, eb)
        rec = variant_record(params, kv)
        if att.kind != "no_op":
            rp, rkv = rank_attention_params(att, model, n), 2 * rank_kv(att, model, n) * d * eb  # one GPU's share
            attn_pf = 2 * b * nq * d * p * p if att.kind == "gqa" else 0  # causal QK^T + PV
            rec["prefill_s"] = _roofline(2 * rp * b * p + attn_pf, rp * eb + act(b * p) + b * p * rkv, cfg) \
                + reduce(att, b * p)
            rec["decode_step_s"] = _roofline(2 * rp * b + 4 * b * nq * d * ctx,
                                             rp * eb + act(b) + b * ctx * rkv, cfg) + reduce(att, b)
        else:
            rec["prefill_s"] = rec["decode_step_s"] = 0.0
        out["attention"][att.name] = rec
    for ffn in ffns:
        params = ffn_param_count(ffn, h)
        rec = variant_record(params, 0)
        spec = ffn_kind(ffn.kind)
        if spec.has_module:
            per_token = 2 * params if spec.flops_per_token is None else spec.flops_per_token(h, ffn.intermediate_size)
            rp = rank_ffn_params(ffn, model, n)
            split = n if is_row_parallel(ffn) else 1  # split kinds: 1/n of the work; other kinds stay whole
            rec["prefill_s"] = _roofline(per_token * b * p / split, rp * eb + act(b * p), cfg) + reduce(ffn, b * p)
            rec["decode_step_s"] = _roofline(per_token * b / split, rp * eb + act(b), cfg) + reduce(ffn, b)
        else:
            rec["prefill_s"] = rec["decode_step_s"] = 0.0
        out["ffn"][ffn.name] = rec
    head = model.embedding_param_count()  # the LM head's weights
    out["fixed"] = {
        "prefill_s": _roofline(2 * head * b, head * ab + act(b * p), cfg),  # LM head on the last token only
        "decode_step_s": _roofline(2 * head * b, head * ab + b * model.vocab_size * 4, cfg),
        "sampling_s": 0.0, "params": model.fixed_param_count(),
    }
    return out
