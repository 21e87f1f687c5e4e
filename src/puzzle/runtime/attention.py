"""GQA attention as the runtime runs it, in the pieces that `puzzle.runtime.subblocks` composes.

q/k/v come from one GEMV when the projections are fused (`puzzle.runtime.fusion`), RoPE is applied, k/v are
written into the layer's static cache, and attention reads the cache without expanding K/V to the query
heads: the queries of one KV group are folded into the query-length dimension, so SDPA reads each cached
byte once. Shapes: B batch, T new tokens, H hidden, Nq/Nkv heads, D head_dim, L attended cache slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from puzzle.model.decoder import AttentionBlock, GQAAttention, apply_rope
from puzzle.runtime.decode_attention import decode_attention
from puzzle.runtime.kv_cache import LayerCache, store


def split_heads(op: GQAAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, T, Nq D], k, v [B, T, Nkv D] -> q [B, Nq, T, D], k, v [B, Nkv, T, D]."""
    b, t, _ = q.shape
    nq, nkv, d = op.num_heads, op.num_kv_heads, op.head_dim
    return (q.reshape(b, t, nq, d).transpose(1, 2), k.reshape(b, t, nkv, d).transpose(1, 2),
            v.reshape(b, t, nkv, d).transpose(1, 2))


def split_qkv(op: GQAAttention, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused projection's output [B, T, (Nq + 2 Nkv) D] -> q [B, Nq, T, D], k, v [B, Nkv, T, D]."""
    nq, nkv, d = op.num_heads, op.num_kv_heads, op.head_dim
    return split_heads(op, *qkv.split([nq * d, nkv * d, nkv * d], dim=-1))


def project_qkv(op: GQAAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normed x [B, T, H] -> q [B, Nq, T, D], k, v [B, Nkv, T, D] (before RoPE); one GEMV when fused."""
    fp8 = getattr(op, "qkv_fp8", None)  # one FP8 GEMM (`puzzle.runtime.fp8`)
    if fp8 is not None:
        return split_qkv(op, fp8(x))
    fused = getattr(op, "qkv_weight", None)  # see puzzle.runtime.fusion
    if fused is None:
        return split_heads(op, op.q_proj(x), op.k_proj(x), op.v_proj(x))
    return split_qkv(op, F.linear(x, fused, getattr(op, "qkv_bias", None)))


def qkv_rope(block: AttentionBlock, h: torch.Tensor, update: torch.Tensor | None, cos: torch.Tensor,
        sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(h + pending update) -> norm -> q [B, Nq, T, D], k, v [B, Nkv, T, D] with RoPE; returns (h, q, k, v)."""
    if update is not None:
        h = h + update
    q, k, v = project_qkv(block.op, block.norm(h))
    return h, apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def qkv_write(block: AttentionBlock, h: torch.Tensor, update: torch.Tensor | None, cos: torch.Tensor,
              sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
              k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None, fresh: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """`qkv_rope`, then k/v written into the cache [B, Nkv, S, D] at `slots` [T]; returns (h, q).

    The part of a GQA sub-block before attention: one compiled region in "fused" mode, so RoPE on k and
    the cache write (with an FP8 cache's quantization: scales given, see `kv_cache.store`) become one kernel.
    """
    h, q, _, _ = qkv_rope_write(block, h, update, cos, sin, k_cache, v_cache, slots, k_scale, v_scale, fresh)
    return h, q


def qkv_rope_write(block: AttentionBlock, h: torch.Tensor, update: torch.Tensor | None, cos: torch.Tensor,
                   sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                   k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None, fresh: bool = False
                   ) -> tuple[torch.Tensor, ...]:
    """`qkv_write` that also returns the new k, v [B, Nkv, T, D]: a fresh causal prefill attends over them
    (`attend_new`) rather than over the cache, which may be FP8. Returns (h, q, k, v)."""
    h, q, k, v = qkv_rope(block, h, update, cos, sin)
    store(k_cache, v_cache, slots, k, v, k_scale, v_scale, fresh)
    return h, q, k, v


def rope_write(op: GQAAttention, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, slots: torch.Tensor, k_scale: torch.Tensor | None = None,
               v_scale: torch.Tensor | None = None, fresh: bool = False) -> torch.Tensor:
    """The fused q/k/v projection's output [B, T, (Nq + 2 Nkv) D] (bias not yet added) -> RoPE -> k/v
    written into the cache at `slots`; returns q [B, Nq, T, D]. The region between `norm_gemv` and SDPA."""
    bias = getattr(op, "qkv_bias", None)
    q, k, v = split_qkv(op, qkv if bias is None else qkv + bias)
    store(k_cache, v_cache, slots, apply_rope(k, cos, sin), v, k_scale, v_scale, fresh)
    return apply_rope(q, cos, sin)


def attend_new(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention over the new keys only (a fresh prefill: SDPA may use its flash kernel): [B, T, Nq*D]."""
    b, nq, t, d = q.shape
    out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=nq != k.shape[1])  # [B, Nq, T, D]
    return out.transpose(1, 2).reshape(b, t, nq * d)


def attend_prefix(q: torch.Tensor, mask: torch.Tensor, cache: LayerCache) -> torch.Tensor:
    """Attention of q [B, Nq, T, D] over the first L = cache.owner.attend_len cached slots: [B, T, Nq*D].

    mask [B, 1, T, L]: bool (True = attend) or additive (0 / large negative), broadcast over heads. An FP8
    cache is dequantized here, before SDPA (which reads only floating-point K/V).
    """
    b, nq, t, d = q.shape
    nkv = cache.k.shape[1]
    n = cache.owner.attend_len
    group = nq // nkv
    # Fold each KV group's queries into the query axis: [B, Nkv, G*T, D]; the mask repeats per group.
    qg = q.reshape(b, nkv, group * t, d)
    m = mask if t == 1 else mask.repeat(1, 1, group, 1)  # [B, 1, G*T, L] (broadcast when T == 1)
    k, v = cache.read(n)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=m)
    out = out.reshape(b, nq, t, d)  # SDPA's output may be non-contiguous on CUDA
    return out.transpose(1, 2).reshape(b, t, nq * d)


def attend_decode(q: torch.Tensor, cache: LayerCache) -> torch.Tensor:
    """One decode token's q [B, Nq, 1, D] over the row's valid slots [owner.start, owner.slots[-1]]: [B, 1, Nq*D].

    The Triton flash-decoding kernel (`puzzle.runtime.decode_attention`): no mask, no read past the last
    written slot, an FP8 cache dequantized in registers; the length comes from the slot tensor, so one captured
    graph serves every step.
    """
    b, nq, t, d = q.shape
    owner = cache.owner
    out = decode_attention(q[:, :, 0], cache.k, cache.v, owner.slots[-1:], owner.start, cache.k_scale,
                           cache.v_scale)  # [B, Nq, D]
    return out.reshape(b, t, nq * d)


def output(block: AttentionBlock, out: torch.Tensor) -> torch.Tensor:
    """o_proj of the attention output [B, T, Nq*D] -> residual update [B, T, H] (a compiled region)."""
    return block.op.o_proj(out)
