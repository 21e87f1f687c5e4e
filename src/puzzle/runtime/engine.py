"""Batched prefill and decode of any Puzzle child on a static per-layer KV cache, with CUDA graphs.

The model (`puzzle.model.decoder.PuzzleModel`) owns the weights; this module owns the inference kernels:
- GQA attention reads its own layer's cache without expanding K/V to the query heads: the queries of
  one KV group are folded into the query-length dimension, so SDPA reads each cached byte once.
- Linear attention and every FFN run as the model's own modules (they need no cache).
- Prompts of different lengths are left-padded: every row writes cache slot t at step t, each row has its
  own positions (slot - pad) and a key mask that hides its pad slots, so a batched row equals the same
  prompt run alone.
- A decode step has static shapes (token ids, slot index and mask live in fixed tensors; attention reads a
  fixed-length prefix of the cache, rounded up to `bucket` slots), so it is captured once per prefix
  length in a `torch.cuda.CUDAGraph`. Modes: "fused" (default on CUDA: each sub-block is one
  torch.compile region that fuses its small kernels, then manual capture), "manual" (eager kernels, manual capture), "compile" (torch.compile
  "reduce-overhead"), "none" (eager; always on CPU). See `resolve_graph_mode` for the measured numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F

from puzzle.core.errors import PuzzleError
from puzzle.model.decoder import AttentionBlock, FFNBlock, GQAAttention, PuzzleModel, SwiGLU, apply_rope
from puzzle.runtime.fusion import fuse_projections
from puzzle.runtime.gemv import available as gemv_available
from puzzle.runtime.gemv import norm_gemv
from puzzle.runtime.kv_cache import LayerCache, StaticKVCache

GraphMode = Literal["auto", "manual", "fused", "compile", "none"]
# Prefills of at most this many tokens (batch x prompt) are captured in CUDA graphs: below it the eager
# prefill is bound by kernel launches; above it by the GPU, and a graph would only hold on to more memory.
PREFILL_GRAPH_TOKENS = 4096


def gqa_attention(block: AttentionBlock, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  mask: torch.Tensor | None, cache: LayerCache) -> torch.Tensor:
    """norm -> q/k/v -> RoPE -> cache write -> attention -> o_proj; returns the residual update [B, T, H].

    mask None means a fresh causal prefill (nothing cached before, no padding): attention over the new
    keys only, which lets SDPA use its flash kernel. Otherwise mask is bool [B, 1, T, L] over the first
    L = cache.owner.attend_len slots.
    """
    _, q, k, v = gqa_qkv(block, block.norm(h), None, cos, sin, normed=True)
    return gqa_core(block, q, k, v, mask, cache)


def project_qkv(op: GQAAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normed x [B, T, H] -> q [B, Nq, T, D], k, v [B, Nkv, T, D] (before RoPE); one GEMV when fused."""
    fused = getattr(op, "qkv_weight", None)  # see puzzle.runtime.fusion
    if fused is None:
        return split_heads(op, op.q_proj(x), op.k_proj(x), op.v_proj(x))
    return split_qkv(op, F.linear(x, fused, getattr(op, "qkv_bias", None)))


def split_qkv(op: GQAAttention, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused projection's output [B, T, (Nq + 2 Nkv) D] -> q [B, Nq, T, D], k, v [B, Nkv, T, D]."""
    nq, nkv, d = op.num_heads, op.num_kv_heads, op.head_dim
    return split_heads(op, *qkv.split([nq * d, nkv * d, nkv * d], dim=-1))


def split_heads(op: GQAAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, T, Nq D], k, v [B, T, Nkv D] -> q [B, Nq, T, D], k, v [B, Nkv, T, D]."""
    b, t, _ = q.shape
    nq, nkv, d = op.num_heads, op.num_kv_heads, op.head_dim
    return (q.reshape(b, t, nq, d).transpose(1, 2), k.reshape(b, t, nkv, d).transpose(1, 2),
            v.reshape(b, t, nkv, d).transpose(1, 2))


def swiglu_act(op: SwiGLU, x: torch.Tensor) -> torch.Tensor:
    """Normed x [B, T, H] -> silu(gate) * up [B, T, I]; one GEMV for gate and up when fused."""
    fused = getattr(op, "gate_up_weight", None)  # see puzzle.runtime.fusion
    gate, up = F.linear(x, fused).chunk(2, dim=-1) if fused is not None else (op.gate_proj(x), op.up_proj(x))
    return F.silu(gate) * up


def run_ffn(op: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An FFN op on normed x [B, T, H] -> [B, T, H]."""
    return op.down_proj(swiglu_act(op, x)) if isinstance(op, SwiGLU) else op(x)


def gqa_qkv(block: AttentionBlock, h: torch.Tensor, update: torch.Tensor | None, cos: torch.Tensor,
            sin: torch.Tensor, normed: bool = False) -> tuple[torch.Tensor, ...]:
    """(h + pending update) -> norm -> q [B, Nq, T, D], k, v [B, Nkv, T, D] with RoPE; returns (h, q, k, v)."""
    if update is not None:
        h = h + update
    q, k, v = project_qkv(block.op, h if normed else block.norm(h))
    return h, apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def gqa_qkv_write(block: AttentionBlock, h: torch.Tensor, update: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """`gqa_qkv`, then k/v written into the cache [B, Nkv, S, D] at `slots` [T]; returns (h, q).

    The part of a GQA sub-block before attention: one compiled region in "fused" mode (see `FusedRegions`),
    so RoPE on k and the cache write become one kernel.
    """
    h, q, k, v = gqa_qkv(block, h, update, cos, sin)
    k_cache.index_copy_(2, slots, k)
    v_cache.index_copy_(2, slots, v)
    return h, q


def rope_write(op: GQAAttention, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The fused q/k/v projection's output [B, T, (Nq + 2 Nkv) D] (bias not yet added) -> RoPE -> k/v
    written into the cache at `slots`; returns q [B, Nq, T, D]. The region between `norm_gemv` and SDPA."""
    bias = getattr(op, "qkv_bias", None)
    q, k, v = split_qkv(op, qkv if bias is None else qkv + bias)
    k_cache.index_copy_(2, slots, apply_rope(k, cos, sin))
    v_cache.index_copy_(2, slots, v)
    return apply_rope(q, cos, sin)


def gqa_core(block: AttentionBlock, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
             cache: LayerCache) -> torch.Tensor:
    """Cache write, attention over the cached prefix, o_proj: the residual update [B, T, H]."""
    op = block.op
    b, nq, t, d = q.shape
    cache.write(k, v)
    if mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=nq != k.shape[1])  # [B, Nq, T, D]
        return op.o_proj(out.transpose(1, 2).reshape(b, t, nq * d))
    return op.o_proj(attend_prefix(q, mask, cache))


def attend_prefix(q: torch.Tensor, mask: torch.Tensor, cache: LayerCache) -> torch.Tensor:
    """Attention of q [B, Nq, T, D] over the first L = cache.owner.attend_len cached slots: [B, T, Nq*D].

    mask [B, 1, T, L]: bool (True = attend) or additive (0 / large negative), broadcast over heads.
    """
    b, nq, t, d = q.shape
    nkv = cache.k.shape[1]
    n = cache.owner.attend_len
    group = nq // nkv
    # Fold each KV group's queries into the query axis: [B, Nkv, G*T, D]; the mask repeats per group.
    qg = q.reshape(b, nkv, group * t, d)
    m = mask if t == 1 else mask.repeat(1, 1, group, 1)  # [B, 1, G*T, L] (broadcast when T == 1)
    out = F.scaled_dot_product_attention(qg, cache.k[:, :, :n], cache.v[:, :, :n], attn_mask=m)
    out = out.reshape(b, nq, t, d)  # SDPA's output may be non-contiguous on CUDA
    return out.transpose(1, 2).reshape(b, t, nq * d)


def attention_out(block: AttentionBlock, out: torch.Tensor) -> torch.Tensor:
    """o_proj of the attention output [B, T, Nq*D] -> residual update [B, T, H] (a compiled region)."""
    return block.op.o_proj(out)


def forward_layers(model: PuzzleModel, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   mask: torch.Tensor | None, cache: StaticKVCache) -> torch.Tensor:
    """Every layer of `model` with the runtime's kernels: [B, T, H] -> [B, T, H]."""
    for layer, layer_cache in zip(model.layers, cache.layers):
        if layer.attention is not None:
            if layer_cache is not None:
                h = h + gqa_attention(layer.attention, h, cos, sin, mask, layer_cache)
            else:
                h = h + layer.attention(h, cos, sin)  # linear attention: no keys, no cache
        if layer.ffn is not None:
            h = h + run_ffn(layer.ffn.op, layer.ffn.norm(h))
    return h


def residual_op(block: AttentionBlock | FFNBlock, h: torch.Tensor, update: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + pending update) -> norm -> op: a linear-attention or FFN sub-block as one region; returns (h, update)."""
    if update is not None:
        h = h + update
    x = block.norm(h)
    return h, (run_ffn(block.op, x) if isinstance(block, FFNBlock) else block.op(x))


def swiglu_in(block: FFNBlock, h: torch.Tensor, update: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + pending update) -> norm -> silu(gate) * up: a SwiGLU sub-block up to its down projection.

    Returns (h, act [B, T, I]); the down projection runs outside, as cuBLAS's matmul (see `FusedRegions`).
    """
    if update is not None:
        h = h + update
    return h, swiglu_act(block.op, block.norm(h))


def head_logits(model: PuzzleModel, h: torch.Tensor, update: torch.Tensor | None, out: torch.Tensor) -> None:
    """(h + pending update) -> final norm -> LM head -> fp32 logits written into out [B, V] (T == 1)."""
    if update is not None:
        h = h + update
    weight = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    out.copy_(F.linear(model.norm(h[:, -1]), weight))


class FusedRegions:
    """The decode step's sub-blocks as compiled regions ("regional" compilation), and at batch 1 as GEMV kernels.

    Each sub-block is compiled on its own, from the previous sub-block's pending residual add up to its
    cache write (GQA: then the attention over the cached prefix runs outside, and o_proj is one more
    region; SwiGLU: up to silu(gate) * up, the down projection runs outside as cuBLAS's matmul), so the add
    fuses with the norm, the norm with the projections and RoPE with the cache write, as a whole-step compile
    would. Sub-blocks of the same shape share one compiled graph (dynamo lifts the weights to inputs), so
    compiling a model costs one compile per distinct sub-block variant, whatever its depth and whatever the
    cached prefix length (the cache read stays outside the regions). And a sub-block runs the same kernels in
    any model, so per-block costs measured on small stacks add up to the model's time (`puzzle.costs.stage`).

    gemv=True (batch 1 on CUDA with Triton): every matrix-vector product is `puzzle.runtime.gemv.norm_gemv`,
    which also does the pending residual add, the norm and SwiGLU's silu(gate) * up; the compiled regions keep
    only RoPE and the cache write. Measured at Llama-3.1-8B's shape on the H200 (benchmarks/README.md).
    Inductor's coordinate-descent tuning made similar kernels, but chose different tile sizes from one
    compile to the next (5-25% per kernel), so no two compiles of a child, nor its costs, ran alike.
    """

    def __init__(self, backend: str | None = "inductor", gemv: bool = False) -> None:
        # backend None: the plain functions (same decomposition, no compile; for tests on CPU).
        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            return fn if backend is None else _compile(fn, backend)

        self.gemv = gemv
        self._gqa_qkv_write = wrap(gqa_qkv_write)
        self._rope_write = wrap(rope_write)
        self._attention_out = wrap(attention_out)
        self._swiglu_in = wrap(swiglu_in)
        self._residual_op = wrap(residual_op)  # linear attention / linear FFN: one matmul
        self._head_logits = wrap(head_logits)

    def qkv(self, block: AttentionBlock, h: torch.Tensor, update: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """`gqa_qkv_write`: (h + update) -> norm -> q/k/v -> RoPE -> cache write; returns (h, q)."""
        weight = getattr(block.op, "qkv_weight", None)
        if self.gemv and weight is not None:
            h, qkv = norm_gemv(h, weight, update, block.norm.weight, block.norm.eps)
            return h, self._rope_write(block.op, qkv, cos, sin, k_cache, v_cache, slots)
        return self._gqa_qkv_write(block, h, update, cos, sin, k_cache, v_cache, slots)

    def attention_out(self, block: AttentionBlock, out: torch.Tensor) -> torch.Tensor:
        """o_proj of the attention output [B, T, Nq*D] -> residual update [B, T, H]."""
        o_proj = block.op.o_proj
        if self.gemv and o_proj.bias is None:
            return norm_gemv(out.contiguous(), o_proj.weight)[1]
        return self._attention_out(block, out)

    def ffn(self, block: FFNBlock, h: torch.Tensor, update: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A SwiGLU sub-block: (h + update) -> norm -> silu(gate) * up -> down; returns (h, its update)."""
        op = block.op
        weight = getattr(op, "gate_up_weight", None)
        if self.gemv and weight is not None and op.down_proj.bias is None:
            h, act = norm_gemv(h, weight, update, block.norm.weight, block.norm.eps, glu=True)
            return h, norm_gemv(act, op.down_proj.weight)[1]
        h, act = self._swiglu_in(block, h, update)
        return h, op.down_proj(act)

    def residual(self, block: AttentionBlock | FFNBlock, h: torch.Tensor, update: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """A linear-attention or linear-FFN sub-block: (h + update) -> norm -> one matrix; returns (h, update)."""
        linear = block.op.linear_attn if isinstance(block, AttentionBlock) else block.op.linear_mlp
        if self.gemv and linear.bias is None:
            return norm_gemv(h, linear.weight, update, block.norm.weight, block.norm.eps)
        return self._residual_op(block, h, update)

    def head(self, model: PuzzleModel, h: torch.Tensor, update: torch.Tensor, out: torch.Tensor) -> None:
        """(h + update) -> final norm -> LM head -> fp32 logits written into out [B, V] (T == 1)."""
        if self.gemv:
            weight = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
            out.copy_(norm_gemv(h, weight, update, model.norm.weight, model.norm.eps)[1][:, 0])
        else:
            self._head_logits(model, h, update, out)


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


def fused_layers(model: PuzzleModel, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                 cache: StaticKVCache, regions: FusedRegions) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer as compiled regions; returns (h, pending update): h + update is the last hidden state.

    The embedding enters as the first pending update onto zeros, so every region (and the head) always gets
    a tensor update: one compiled graph per sub-block variant, not one more for the first layer.
    """
    h, update = torch.zeros_like(h), h
    for layer, layer_cache in zip(model.layers, cache.layers):
        if layer.attention is not None:
            if layer_cache is not None:
                h, q = regions.qkv(layer.attention, h, update, cos, sin, layer_cache.k, layer_cache.v, cache.slots)
                update = regions.attention_out(layer.attention, attend_prefix(q, mask, layer_cache))
            else:
                h, update = regions.residual(layer.attention, h, update)
        if layer.ffn is not None and isinstance(layer.ffn.op, SwiGLU):
            h, update = regions.ffn(layer.ffn, h, update)
        elif layer.ffn is not None:
            h, update = regions.residual(layer.ffn, h, update)
    return h, update


def resolve_graph_mode(mode: GraphMode, device: torch.device) -> str:
    if mode not in ("auto", "manual", "fused", "compile", "none"):
        raise PuzzleError(f"unknown graph mode {mode!r}; use auto, manual, fused, compile or none")
    if device.type != "cuda":
        return "none"  # CUDA graphs exist only on CUDA; CPU runs eagerly
    # "fused" (per-sub-block compiled regions + manual capture) is the default: D measured a whole-step
    # compile at 5.44 ms/token for Llama-3.1-8B at batch 1 on the H200, against 7.29 for plain manual capture
    # and 22.8 eager; the regions keep those fusions, compile once per sub-block variant, and keep per-block
    # costs additive (benchmarks/README.md has the current numbers).
    return "fused" if mode == "auto" else mode


class Engine:
    """Prefill + decode for one batch size and maximum sequence length (prompt + generated)."""

    def __init__(self, model: PuzzleModel, batch_size: int, max_seq_len: int, graphs: GraphMode = "auto",
                 bucket: int = 256, fuse: bool | None = None) -> None:
        """fuse: run q/k/v and gate/up as single GEMVs (`puzzle.runtime.fusion`); None = on CUDA only."""
        config = model.config
        if max_seq_len > config.max_position_embeddings:
            raise PuzzleError(
                f"prompt + generated tokens = {max_seq_len} exceeds the model's context of "
                f"{config.max_position_embeddings}; shorten the prompt or generate fewer tokens"
            )
        self.model = model
        self.batch_size, self.max_seq_len, self.bucket = batch_size, max_seq_len, bucket
        self.device = model.embed_tokens.weight.device
        self.dtype = model.embed_tokens.weight.dtype
        self.graph_mode = resolve_graph_mode(graphs, self.device)
        fuse_projections(model, self.device.type == "cuda" if fuse is None else fuse)
        self.cache = StaticKVCache(config, batch_size, max_seq_len, self.device, self.dtype)
        b, s, dev = batch_size, max_seq_len, self.device
        self.valid = torch.zeros(b, s, dtype=torch.bool, device=dev)  # [B, S] slots holding real tokens
        self.pad = torch.zeros(b, dtype=torch.long, device=dev)  # [B] left-padding per row
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)  # [1] the slot this decode step writes
        self.ids = torch.zeros(b, 1, dtype=torch.long, device=dev)  # [B, 1] this step's input tokens
        self.logits = torch.zeros(b, config.vocab_size, dtype=torch.float32, device=dev)  # [B, V]
        self.length = 0  # slots filled so far (same for every row thanks to left-padding)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}  # decode step per attended prefix length
        # prefill per (prompt length, padded): the graph and its static input ids [B, P]
        self._prefill_graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self._compiled = None
        # "fused": per-sub-block compiled regions (see FusedRegions), then the manual capture.
        gemv = batch_size == 1 and gemv_available(self.device)  # Triton GEMVs: see FusedRegions
        self._regions = FusedRegions(gemv=gemv) if self.graph_mode == "fused" else None

    # ---- prefill ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, pad_lens: torch.Tensor | None = None) -> torch.Tensor:
        """Left-padded prompts [B, P] (pad_lens [B] pad tokens at the front of each row) -> last logits [B, V].

        With CUDA graphs on and at most PREFILL_GRAPH_TOKENS tokens in the batch, the prefill is captured
        once per (prompt length, padded or not) and replayed: small prefills are bound by kernel launches
        (Llama-3.1-8B at batch 1, 128 tokens: 15-30 ms eager, depending on the host), larger ones by the GPU.
        """
        b, p = input_ids.shape
        if b != self.batch_size:
            raise PuzzleError(f"engine built for batch {self.batch_size}, got {b} prompts")
        if p >= self.max_seq_len:
            raise PuzzleError(f"prompt of {p} tokens leaves no room to generate within {self.max_seq_len}")
        padded = pad_lens is not None and bool((pad_lens > 0).any())
        self.pad.copy_(pad_lens.to(self.device) if pad_lens is not None else torch.zeros_like(self.pad))
        if self.graph_mode in ("manual", "fused") and b * p <= PREFILL_GRAPH_TOKENS:
            self._prefill_replay(input_ids, padded)
        else:
            self._prefill_body(input_ids.to(self.device), padded)
        self.length = p
        return self.logits

    def _prefill_body(self, input_ids: torch.Tensor, padded: bool) -> None:
        """The prefill on device tensors, writing the cache and self.logits (graph-capturable: no host sync)."""
        dev = self.device
        p = input_ids.shape[1]
        ar = torch.arange(p, device=dev)
        self.valid.zero_()
        self.valid[:, :p] = ar[None, :] >= self.pad[:, None]
        positions = (ar[None, :] - self.pad[:, None]).clamp(min=0)  # [B, P]
        self.cache.set_slots(ar, attend_len=p)
        mask = None
        if padded:
            causal = torch.ones(p, p, dtype=torch.bool, device=dev).tril()
            mask = causal[None] & self.valid[:, None, :p]  # [B, P, P]
            # A pad query sees only itself, so its (ignored) state stays finite and cannot poison K/V.
            mask = (mask | torch.eye(p, dtype=torch.bool, device=dev)[None])[:, None]  # [B, 1, P, P]
        h = self.model.embed(input_ids)
        cos, sin = self.model.rope(positions, h.dtype)
        h = forward_layers(self.model, h, cos, sin, mask, self.cache)
        self.logits.copy_(self.model.head(h[:, -1:])[:, 0].float())

    def _prefill_replay(self, input_ids: torch.Tensor, padded: bool) -> None:
        key = (input_ids.shape[1], padded)
        if key not in self._prefill_graphs:
            ids = torch.zeros_like(input_ids, device=self.device)  # the graph's static input [B, P]
            ids.copy_(input_ids)
            self._prefill_graphs[key] = (self._capture(lambda: self._prefill_body(ids, padded), warmup=1), ids)
        graph, ids = self._prefill_graphs[key]
        ids.copy_(input_ids)
        graph.replay()

    # ---- decode ----------------------------------------------------------------------------------

    def attend_len(self, length: int) -> int:
        """Cache prefix a step at `length` filled slots reads: exact when eager, bucketed for graphs."""
        if self.graph_mode == "none":
            return length + 1
        return min(self.max_seq_len, -(-(length + 1) // self.bucket) * self.bucket)

    def _step(self, attend_len: int) -> None:
        """One decode step on the static buffers (graph-capturable: no host sync, fixed shapes)."""
        self.valid.index_fill_(1, self.slot, True)
        positions = (self.slot - self.pad)[:, None]  # [B, 1]
        h = self.model.embed(self.ids)  # [B, 1, H]
        cos, sin = self.model.rope(positions, h.dtype)
        # Additive mask [B, 1, 1, L], built once per step rather than converted from bool in every layer's SDPA.
        mask = (~self.valid[:, None, None, :attend_len]).to(h.dtype) * torch.finfo(h.dtype).min
        if self._regions is not None:
            h, update = fused_layers(self.model, h, cos, sin, mask, self.cache, self._regions)
            self._regions.head(self.model, h, update, self.logits)
        else:
            h = forward_layers(self.model, h, cos, sin, mask, self.cache)
            self.logits.copy_(self.model.head(h)[:, 0].float())

    def _capture(self, body: Callable[[], None], warmup: int = 2) -> torch.cuda.CUDAGraph:
        """Warm `body` up on a side stream, then capture it (every graph shares one pool: they never run
        concurrently, and each one's temporaries are dead once it ends)."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):  # warm-up runs are harmless: the body is idempotent on its inputs
                body()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            body()
        return graph

    def _replay(self, attend_len: int) -> None:
        graph = self._graphs.get(attend_len)
        if graph is None:
            graph = self._graphs[attend_len] = self._capture(lambda: self._step(attend_len))
        graph.replay()

    def _run_compiled(self, attend_len: int) -> None:
        if self._compiled is None:
            for t in [self.valid, self.pad, self.slot, self.ids, self.logits, *self.cache.tensors()]:
                torch._dynamo.mark_static_address(t)
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self._compiled = torch.compile(self._step, mode="reduce-overhead", dynamic=False)
        self._compiled(attend_len)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ([B]); returns the next-token logits [B, V] (a buffer reused each step)."""
        if self.length >= self.max_seq_len:
            raise PuzzleError(f"the KV cache is full ({self.max_seq_len} tokens); build the engine longer")
        self.ids.copy_(tokens.view(self.batch_size, 1))
        self.slot.fill_(self.length)
        n = self.attend_len(self.length)
        self.cache.set_slots(self.slot, attend_len=n)
        if self.graph_mode in ("manual", "fused"):
            self._replay(n)
        elif self.graph_mode == "compile":
            self._run_compiled(n)
        else:
            self._step(n)
        self.length += 1
        return self.logits


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> left-padded ids [B, P] and pad counts [B]."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise PuzzleError("every prompt needs at least one token (add a BOS token to an empty prompt)")
    p = max(len(x) for x in prompts)
    ids = torch.full((len(prompts), p), pad_id, dtype=torch.long)
    for i, x in enumerate(prompts):
        ids[i, p - len(x):] = torch.tensor(x, dtype=torch.long)
    pads = torch.tensor([p - len(x) for x in prompts], dtype=torch.long)
    return ids, pads
