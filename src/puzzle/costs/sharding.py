"""What one GPU of a tensor-parallel workload holds and pays, from the sharding rules of
`puzzle.runtime.tensor_parallel` (its docstring): per-GPU parameters and KV bytes of each variant, the
parent's per-GPU memory, and the analytic all-reduce time the estimate adds per row-parallel sub-block.

Query heads, SwiGLU intermediates and linear sub-blocks split over the ranks; KV heads split when
Nkv % world == 0 and are partly replicated otherwise; embeddings, norms, the LM head and any other FFN kind
stay whole on every rank. The costs file states these numbers (`tensor_parallel` section), so the search
prices memory per GPU without repeating the rules.
"""

from __future__ import annotations

from typing import Any

from puzzle.core.workloads import Workload
from puzzle.model.blocks import (
    AttentionConfig,
    FFNConfig,
    ModelConfig,
    attention_param_count,
    ffn_param_count,
)
from puzzle.model.memory import activation_bytes
from puzzle.runtime.tensor_parallel import rank_kv_heads

# Datasheet interconnect of the estimate (H100/H200 SXM, NVLink 4: 900 GB/s per GPU, both directions
# together) and a fixed launch + synchronisation latency per all-reduce; both written into the costs file.
NVLINK_BANDWIDTH = 900e9  # bytes/s
ALLREDUCE_LATENCY_S = 10e-6


def rank_kv(att: AttentionConfig, model: ModelConfig, world: int) -> int:
    """KV heads one rank caches for an attention variant (0 for linear / no-op)."""
    if att.kind != "gqa":
        return 0
    return rank_kv_heads(model.num_attention_heads, att.num_kv_heads, world)


def rank_attention_params(att: AttentionConfig, model: ModelConfig, world: int) -> int:
    """Parameters one rank holds of an attention variant (its norm whole)."""
    h, d = model.hidden_size, model.head_dim
    if att.kind == "gqa":
        return attention_param_count(AttentionConfig.gqa(rank_kv(att, model, world)), h, d,
                                     model.num_attention_heads // world, model.attention_bias)
    if att.kind == "linear":
        return h + h * h // world
    return 0


def rank_ffn_params(ffn: FFNConfig, model: ModelConfig, world: int) -> int:
    """Parameters one rank holds of an FFN variant (its norm whole; other kinds stay whole)."""
    h = model.hidden_size
    if ffn.kind == "swiglu":
        return ffn_param_count(FFNConfig.swiglu(ffn.intermediate_size // world), h)
    if ffn.kind == "linear":
        return h + h * h // world
    return ffn_param_count(ffn, h)


def is_row_parallel(part: AttentionConfig | FFNConfig) -> bool:
    """Whether the sharded sub-block ends in an all-reduce (every split kind; other FFN kinds stay whole)."""
    return part.kind in ("gqa", "linear", "swiglu")


def allreduce_s(nbytes: float, world: int) -> float:
    """A ring all-reduce of `nbytes` per rank over NVLink (datasheet): latency + 2 (n-1)/n x bytes / bandwidth."""
    if world == 1:
        return 0.0
    return ALLREDUCE_LATENCY_S + 2 * (world - 1) / world * nbytes / NVLINK_BANDWIDTH


def per_gpu_section(model: ModelConfig, atts: list[AttentionConfig], ffns: list[FFNConfig], w: Workload,
                    weight_bytes: int, compute_bytes: int) -> dict[str, Any]:
    """The costs file's `tensor_parallel` section: degree, per-GPU params and KV bytes per variant and the
    parent's per-GPU memory (weights + KV + the whole activation estimate: hidden states are replicated)."""
    n, d = w.tensor_parallel, model.head_dim
    per_att = {a.name: {"params": rank_attention_params(a, model, n),
                        "kv_bytes_per_token": 2 * rank_kv(a, model, n) * d * weight_bytes} for a in atts}
    per_ffn = {f.name: {"params": rank_ffn_params(f, model, n), "kv_bytes_per_token": 0} for f in ffns}
    fixed = model.fixed_param_count()
    layers = sum(rank_attention_params(b.attention, model, n) + rank_ffn_params(b.ffn, model, n)
                 for b in model.blocks)
    kv = sum(2 * rank_kv(b.attention, model, n) * d * weight_bytes for b in model.blocks)
    weights = layers * weight_bytes + fixed * compute_bytes
    act = activation_bytes(model, w.batch_size, w.prompt_len, compute_bytes)
    kv_total = kv * w.batch_size * w.max_seq_len
    return {"degree": n,
            "per_gpu": {"attention": per_att, "ffn": per_ffn, "fixed": {"params": fixed}},
            "parent_per_gpu": {"weights_bytes": weights, "kv_cache_bytes": kv_total, "activation_bytes": act,
                               "total_bytes": weights + kv_total + act}}


def max_batch_per_gpu(section: dict[str, Any], w: Workload, memory_bytes: int) -> int:
    """The largest batch whose per-GPU weights + KV + activations fit in one GPU's memory (linear in batch)."""
    mem = section["parent_per_gpu"]
    per_seq = (mem["kv_cache_bytes"] + mem["activation_bytes"]) / w.batch_size
    free = memory_bytes - mem["weights_bytes"]
    return max(0, int(free // per_seq)) if per_seq > 0 else 0
