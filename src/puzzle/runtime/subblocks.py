"""What the engine's one layer loop calls per sub-block: eager kernels, or compiled regions and batch-1 GEMVs.

Every sub-block takes the hidden state h and the previous sub-block's pending residual update, and returns
(h, its own update): h + update is the hidden state after it. Carrying the add into the next sub-block lets
a compiled region fuse it with the norm and the projections.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from puzzle.model.decoder import AttentionBlock, FFNBlock, LinearFFN, PuzzleModel, SwiGLU
from puzzle.runtime import attention
from puzzle.runtime.gemv import norm_gemv
from puzzle.runtime.kv_cache import LayerCache


def swiglu_act(op: SwiGLU, x: torch.Tensor) -> torch.Tensor:
    """Normed x [B, T, H] -> silu(gate) * up [B, T, I]; one GEMV for gate and up when fused."""
    fp8 = getattr(op, "gate_up_fp8", None)  # one FP8 GEMM (`puzzle.runtime.fp8`)
    fused = getattr(op, "gate_up_weight", None)  # see puzzle.runtime.fusion
    if fp8 is not None:
        gate, up = fp8(x).chunk(2, dim=-1)
    else:
        gate, up = F.linear(x, fused).chunk(2, dim=-1) if fused is not None else (op.gate_proj(x), op.up_proj(x))
    return F.silu(gate) * up


def residual_op(block: AttentionBlock | FFNBlock, h: torch.Tensor, update: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + pending update) -> norm -> op: a linear-attention or linear-FFN sub-block; returns (h, update)."""
    if update is not None:
        h = h + update
    return h, block.op(block.norm(h))


def swiglu_in(block: FFNBlock, h: torch.Tensor, update: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + pending update) -> norm -> silu(gate) * up: a SwiGLU sub-block up to its down projection.

    Returns (h, act [B, T, I]); the down projection runs outside, as cuBLAS's matmul.
    """
    if update is not None:
        h = h + update
    return h, swiglu_act(block.op, block.norm(h))


def head_logits(model: PuzzleModel, h: torch.Tensor, update: torch.Tensor | None, out: torch.Tensor) -> None:
    """(h + pending update) -> final norm -> LM head of the last position -> fp32 logits written into out [B, V]."""
    if update is not None:
        h = h + update
    weight = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    out.copy_(F.linear(model.norm(h[:, -1]), weight))


class FusedRegions:
    """The sub-blocks as compiled regions ("regional" compilation), and at batch 1 as GEMV kernels.

    backend None: the same decomposition as plain functions, the runtime's eager kernels (the default prefill,
    and the decode step in graph modes "manual" and "none"). A compiled prefill (`Engine(prefill="compiled")`)
    runs the same regions at its T tokens (SDPA and SwiGLU's down projection outside them).

    Each sub-block is compiled on its own, from the previous sub-block's pending residual add up to its
    cache write (GQA: then the attention over the cached prefix runs outside, and o_proj is one more
    region; SwiGLU: up to silu(gate) * up, the down projection runs outside as cuBLAS's matmul), so the add
    fuses with the norm, the norm with the projections and RoPE with the cache write, as a whole-step compile
    would. Sub-blocks of the same shape share one compiled graph (dynamo lifts the weights to inputs), so
    compiling a model costs one compile per distinct sub-block variant, whatever its depth and whatever the
    cached prefix length (the cache read stays outside the regions). And a sub-block runs the same kernels in
    any model, so per-block costs measured on small stacks add up to the model's time (`puzzle.costs`).

    gemv=True (batch 1 on CUDA with Triton): every matrix-vector product is `puzzle.runtime.gemv.norm_gemv`,
    which also does the pending residual add, the norm and SwiGLU's silu(gate) * up; the compiled regions keep
    only RoPE and the cache write. Measured at Llama-3.1-8B's shape on the H200 (benchmarks/README.md).
    decode_kernel=True: a one-token step attends with the Triton flash-decoding kernel (`attention.attend_decode`:
    only the valid slots, FP8 dequantized in registers) instead of SDPA over the masked prefix.
    Inductor's coordinate-descent tuning made similar kernels, but chose different tile sizes from one
    compile to the next (5-25% per kernel), so no two compiles of a child, nor its costs, ran alike.
    """

    def __init__(self, backend: str | None = "inductor", gemv: bool = False, decode_kernel: bool = False) -> None:
        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            return fn if backend is None else _compile(fn, backend)

        self.compiled = backend is not None
        self.gemv = gemv
        self.decode_kernel = decode_kernel
        self._qkv_write = wrap(attention.qkv_write)
        self._qkv_rope_write = wrap(attention.qkv_rope_write)  # fresh causal prefill: SDPA reads the new k/v
        self._rope_write = wrap(attention.rope_write)
        self._attention_out = wrap(attention.output)
        self._swiglu_in = wrap(swiglu_in)
        self._residual_op = wrap(residual_op)  # linear attention / linear FFN: one matmul
        self._head_logits = wrap(head_logits)

    def begin(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The embedding [B, T, H] -> (h, pending update) that the first sub-block starts from.

        Compiled, the embedding enters as the first pending update onto zeros, so every region always gets a
        tensor update: one compiled graph per sub-block variant, not one more for the first layer.
        """
        return (torch.zeros_like(h), h) if self.compiled else (h, None)

    def gqa(self, block: AttentionBlock, h: torch.Tensor, update: torch.Tensor | None, cos: torch.Tensor,
            sin: torch.Tensor, mask: torch.Tensor | None, cache: LayerCache) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + update) -> norm -> q/k/v -> RoPE -> cache write -> attention -> o_proj; returns (h, its update).

        mask None means a fresh causal prefill (nothing cached before, no padding): attention over the new
        keys only. Otherwise mask [B, 1, T, L] (bool or additive) over the first L = cache.owner.attend_len slots;
        with the decode kernel a one-token step ignores it (the kernel reads each row's valid slots itself).
        """
        if mask is None:
            h, q, k, v = self._qkv_rope_write(block, h, update, cos, sin, cache.k, cache.v, cache.owner.slots,
                                              cache.k_scale, cache.v_scale, cache.owner.fresh)
            return h, self.attention_out(block, attention.attend_new(q, k, v))
        weight = getattr(block.op, "qkv_weight", None)
        if self.gemv and weight is not None:
            h, qkv = norm_gemv(h, weight, update, block.norm.weight, block.norm.eps)
            q = self._rope_write(block.op, qkv, cos, sin, cache.k, cache.v, cache.owner.slots, cache.k_scale,
                                 cache.v_scale, cache.owner.fresh)
        else:
            h, q = self._qkv_write(block, h, update, cos, sin, cache.k, cache.v, cache.owner.slots, cache.k_scale,
                                   cache.v_scale, cache.owner.fresh)
        if self.decode_kernel and q.shape[2] == 1:
            return h, self.attention_out(block, attention.attend_decode(q, cache))
        return h, self.attention_out(block, attention.attend_prefix(q, mask, cache))

    def attention_out(self, block: AttentionBlock, out: torch.Tensor) -> torch.Tensor:
        """o_proj of the attention output [B, T, Nq*D] -> residual update [B, T, H]."""
        o_proj = block.op.o_proj
        if self.gemv and o_proj.bias is None:
            return norm_gemv(out.contiguous(), o_proj.weight)[1]
        return self._attention_out(block, out)

    def ffn(self, block: FFNBlock, h: torch.Tensor, update: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """An FFN sub-block: SwiGLU (h + update) -> norm -> silu(gate) * up -> down, or a linear FFN.

        Any other registered kind (`puzzle.model.kinds`) has no fused kernel here: its module runs eagerly.
        """
        op = block.op
        if isinstance(op, LinearFFN):
            return self.residual(block, h, update)
        if not isinstance(op, SwiGLU):
            return residual_op(block, h, update)
        weight = getattr(op, "gate_up_weight", None)
        if self.gemv and weight is not None and op.down_proj.bias is None:
            h, act = norm_gemv(h, weight, update, block.norm.weight, block.norm.eps, glu=True)
            return h, norm_gemv(act, op.down_proj.weight)[1]
        h, act = self._swiglu_in(block, h, update)
        return h, op.down_proj(act)

    def residual(self, block: AttentionBlock | FFNBlock, h: torch.Tensor, update: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """A linear-attention or linear-FFN sub-block: (h + update) -> norm -> one matrix; returns (h, update)."""
        linear = block.op.linear_attn if isinstance(block, AttentionBlock) else block.op.linear_mlp
        if self.gemv and linear.bias is None:
            return norm_gemv(h, linear.weight, update, block.norm.weight, block.norm.eps)
        return self._residual_op(block, h, update)

    def head(self, model: PuzzleModel, h: torch.Tensor, update: torch.Tensor | None, out: torch.Tensor) -> None:
        """(h + update) -> final norm -> LM head of the last position -> fp32 logits written into out [B, V]."""
        if self.gemv:
            weight = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
            out.copy_(norm_gemv(h, weight, update, model.norm.weight, model.norm.eps)[1][:, 0])
        else:
            self._head_logits(model, h, update, out)


EAGER = FusedRegions(backend=None)  # the plain kernels: stateless, shared by every engine

_COMPILED: dict[tuple[Callable[..., Any], str], Callable[..., Any]] = {}


def _compile(fn: Callable[..., Any], backend: str) -> Callable[..., Any]:
    key = (fn, backend)
    if key not in _COMPILED:
        cfg = torch._dynamo.config
        # One graph per distinct sub-block shape and batch size: allow many before falling back to eager.
        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 512))
        cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 4096)
        # dynamic=False: shapes never become symbolic (a second FFN width would otherwise turn every
        # later compile dynamic, with slower kernels); each shape gets its own static graph.
        _COMPILED[key] = torch.compile(fn, dynamic=False, backend=backend)
    return _COMPILED[key]
