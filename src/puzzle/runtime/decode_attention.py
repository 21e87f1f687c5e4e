"""Decode attention (one query token per sequence) over the static KV cache: a Triton flash-decoding kernel.

SDPA over the static cache reads a fixed-length prefix under a mask (every allocated slot of a bucket), and an
FP8 cache had to be dequantized to the compute dtype in full before it (`LayerCache.read`). This kernel reads
only the valid slots [start_b, last + 1) of each row, straight from the cache (FP8 bytes dequantized in
registers), and takes `last` and `start` from device tensors, so one CUDA graph serves every decode step.

Design (flash decoding): stage 1 runs one program per (row, KV head, split); the split's slots are a contiguous
share of the row's valid range, computed on the device from its length, so every split has work at every
length. A program holds the G = Nq / Nkv query heads of its KV head, so each K/V byte is read once; it keeps an
online softmax in fp32 and writes its normalised partial output and log-sum-exp. Stage 2 merges the splits.
With one split, stage 1 writes the output itself. The launch configuration is a fixed function of the shape
(`decode_config`), never timed at run time, so the same kernels run in the cost measurement and in serving.

FP8 cache: K/V are e4m3 bits in uint8 tensors with one fp32 scale each per layer (`puzzle.runtime.kv_cache`).
e4m3 values are exact in bf16/fp16/fp32, so the kernel converts the bits to the compute dtype and applies the
scales outside the products: k_scale with the softmax scale on the scores, v_scale on the output.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal

import torch

from puzzle.core.errors import PuzzleError

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: decode attention stays on SDPA
    triton = None

DecodeAttention = Literal["auto", "triton", "sdpa"]
DECODE_ATTENTION: tuple[str, ...] = ("auto", "triton", "sdpa")  # what Engine and the benchmarks accept
AUTO_BATCH = 128  # "auto" uses the kernel for a bf16 cache from this batch up (between 64: behind, 256: ahead)
# Stage-1 programs to aim for: ~8 per SM of a 132-SM H200, so the last wave's raggedness costs little.
TARGET_PROGRAMS = 1024
MAX_SPLITS = 64
_LOG2E = 1.4426950408889634
# Triton's CPU interpreter multiplies bf16/fp16 tiles wrongly (its numpy has no bf16): there, products run in fp32
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Whether the kernel can run on tensors on `device`: CUDA with Triton, or CPU in Triton's interpreter."""
    if triton is None:
        return False
    return device.type == "cuda" or _INTERPRET


def resolve(mode: str, device: torch.device, fp8_cache: bool, batch_size: int = 1) -> bool:
    """Whether decode steps use the Triton kernel (True) or SDPA (False), for an engine's option.

    "auto" picks the kernel on a CUDA GPU where it was measured ahead (benchmarks/decode_attention.py and
    decode_profile.py, H200, Llama-3.1-8B shape):
    - an FP8 cache on a GPU that converts e4m3 in hardware (compute capability >= 8.9): SDPA would first
      dequantize the whole cache every step (15-17x slower attention);
    - a bf16/fp16 cache from AUTO_BATCH streams up: at batch 256 the kernel's attention is 1.30-1.34x faster and
      the whole 2k-context step 1.19x (24.5 vs 29.2 ms); at batch 64 SDPA is ahead by 2-4%, so it stays below.
    """
    if mode not in DECODE_ATTENTION:
        raise PuzzleError(f"unknown decode attention {mode!r}; use {', '.join(DECODE_ATTENTION)}")
    if mode == "sdpa":
        return False
    if mode == "triton":
        if not available(device):
            raise PuzzleError(f"decode_attention='triton' needs Triton and a CUDA device (or TRITON_INTERPRET=1), "
                              f"got device {device}; use 'sdpa' or 'auto'")
        return True
    if device.type != "cuda" or not available(device):
        return False
    if fp8_cache:
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return batch_size >= AUTO_BATCH


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int  # cache slots per inner iteration
    num_splits: int  # programs per (row, KV head) along the sequence
    num_warps: int
    num_stages: int


def decode_config(batch: int, kv_heads: int, max_len: int, head_dim: int) -> DecodeConfig:
    """Launch configuration for a cache [batch, kv_heads, max_len, head_dim]: a fixed rule of the shape.

    Splits fill the GPU when batch x KV heads alone would not (TARGET_PROGRAMS), at most one per block of a
    full cache; with batch x KV heads >= TARGET_PROGRAMS (e.g. Llama-3.1-8B at batch 128+) one split suffices.
    Tiles: 32 slots x head dim 128, 4 warps, 2 stages compiles for sm_90 (Triton 3.9) to pipelined 16-byte
    loads, 80 registers a thread and 21 KB of shared memory with a bf16 cache, 128 and 13 KB with FP8 (64 slots:
    80 / 39 KB and 168 / 23 KB). benchmarks/decode_attention.py times the alternatives (`--sweep`).
    """
    block_n = 32 if head_dim <= 128 else 16
    rows = max(1, batch * kv_heads)
    splits = max(1, min(MAX_SPLITS, TARGET_PROGRAMS // rows, -(-max_len // block_n)))
    return DecodeConfig(block_n=block_n, num_splits=splits, num_warps=4, num_stages=2)


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << max(0, (n - 1).bit_length()))


if triton is not None:

    @triton.jit
    def _split_kernel(q_ptr, k_ptr, v_ptr, last_ptr, start_ptr, ks_ptr, vs_ptr, o_ptr, lse_ptr, out_ptr,
                      sq_b, sq_h, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b, so_h, last_stride, qk_scale, kv_heads,
                      GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, HAS_START: tl.constexpr, FP8: tl.constexpr,
                      IEEE: tl.constexpr, DIRECT: tl.constexpr):
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // kv_heads
        kvh = pid % kv_heads
        end = tl.load(last_ptr + b * last_stride).to(tl.int32) + 1  # valid slots end here (exclusive)
        begin = 0
        if HAS_START:
            begin = tl.load(start_ptr + b).to(tl.int32)
        # this split's share of [begin, end), whole blocks of it, computed on the device: no length on the host
        chunk = tl.cdiv(tl.cdiv(end - begin, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = begin + split * chunk
        hi = tl.minimum(lo + chunk, end)

        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        g_ok = offs_g < GROUP
        d_ok = offs_d < HEAD_DIM
        heads = kvh * GROUP + offs_g  # the query heads of this KV head (repeat_interleave's order)
        b64 = b.to(tl.int64)
        q = tl.load(q_ptr + b64 * sq_b + heads[:, None] * sq_h + offs_d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
        scale = qk_scale  # softmax scale * log2(e) (* k_scale): scores in base 2
        if FP8:
            scale = scale * tl.load(ks_ptr)
        k_base = k_ptr + b64 * sk_b + kvh.to(tl.int64) * sk_h
        v_base = v_ptr + b64 * sv_b + kvh.to(tl.int64) * sv_h
        m = tl.full([BLOCK_G], -1.0e30, tl.float32)  # finite: an all-masked block then adds exp2(-inf) = 0
        den = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            pos = n0 + offs_n
            ok = pos < hi
            kt = tl.load(k_base + pos[None, :] * sk_t + offs_d[:, None], mask=ok[None, :] & d_ok[:, None],
                         other=0)  # [BLOCK_D, BLOCK_N]; slots past `hi` are never read
            v = tl.load(v_base + pos[:, None] * sv_t + offs_d[None, :], mask=ok[:, None] & d_ok[None, :],
                        other=0)  # [BLOCK_N, BLOCK_D]
            if FP8:
                kt = kt.to(tl.float8e4nv, bitcast=True).to(q.dtype)
                v = v.to(tl.float8e4nv, bitcast=True).to(q.dtype)
            if IEEE:
                s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
            else:
                s = tl.dot(q, kt)
            s = tl.where(ok[None, :], s * scale, float("-inf"))  # [BLOCK_G, BLOCK_N]
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            den = den * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        out = acc / tl.where(den > 0, den, 1.0)[:, None]
        if FP8:
            out = out * tl.load(vs_ptr)
        tile_ok = g_ok[:, None] & d_ok[None, :]
        if DIRECT:  # one split: this is the output
            tl.store(out_ptr + b64 * so_b + heads[:, None] * so_h + offs_d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=tile_ok)
        else:  # partials [B * Nq, NUM_SPLITS, D] fp32 and log2-sum-exp [B * Nq, NUM_SPLITS] (-inf: empty split)
            row = (b64 * (kv_heads * GROUP) + heads) * NUM_SPLITS + split
            tl.store(o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=tile_ok)
            lse = tl.where(den > 0, m + tl.log2(tl.where(den > 0, den, 1.0)), float("-inf"))
            tl.store(lse_ptr + row, lse, mask=g_ok)

    @triton.jit
    def _merge_kernel(o_ptr, lse_ptr, out_ptr, so_b, so_h, q_heads, HEAD_DIM: tl.constexpr,
                      BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
        pid = tl.program_id(0)  # one (row, query head)
        b = pid // q_heads
        h = pid % q_heads
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        s_ok = offs_s < NUM_SPLITS
        d_ok = offs_d < HEAD_DIM
        row = pid.to(tl.int64) * NUM_SPLITS + offs_s
        lse = tl.load(lse_ptr + row, mask=s_ok, other=float("-inf"))
        top = tl.max(lse, 0)
        top = tl.where(top == float("-inf"), 0.0, top)
        w = tl.exp2(lse - top)  # empty splits weigh 0
        o = tl.load(o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        total = tl.sum(w, 0)
        out = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + b.to(tl.int64) * so_b + h * so_h + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, last: torch.Tensor,
                     start: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None, sm_scale: float | None = None,
                     config: DecodeConfig | None = None) -> torch.Tensor:
    """Attention of one query per row over the valid cache slots: q [B, Nq, D] -> [B, Nq, D] in q's dtype.

    k, v [B, Nkv, S, D] (the cache as `kv_cache.StaticKVCache` lays it out; bf16/fp16/fp32, or uint8 e4m3 bits
    with k_scale, v_scale [1] fp32); last [1] or [B] long: the last valid slot (the one this step wrote), so
    row b attends slots [start[b], last + 1); start [B] long (left padding) or None (0). sm_scale: the
    softmax scale, 1/sqrt(D) by default (as SDPA). Nq must be a multiple of Nkv; query head h reads KV head
    h // (Nq / Nkv).
    """
    b, nq, d = q.shape
    nkv, s = k.shape[1], k.shape[2]
    fp8 = k.dtype == torch.uint8
    if k.shape != (b, nkv, s, d) or v.shape != k.shape or nq % nkv or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise PuzzleError(f"decode attention got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; it "
                          "needs q [B, Nq, D], k = v [B, Nkv, S, D] with Nkv dividing Nq and contiguous rows")
    if fp8 and (k_scale is None or v_scale is None):
        raise PuzzleError("an FP8 (uint8) KV cache needs its k_scale and v_scale; pass the LayerCache's scales")
    if q.stride(-1) != 1:
        q = q.contiguous()
    cfg = config or decode_config(b, nkv, s, d)
    group = nq // nkv
    out = torch.empty(b, nq, d, dtype=q.dtype, device=q.device)
    direct = cfg.num_splits == 1
    if direct:  # unused by the kernel; any fp32 tensor
        partial = lse = out
    else:
        partial = torch.empty(b * nq, cfg.num_splits, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(b * nq, cfg.num_splits, dtype=torch.float32, device=q.device)
    scale = (1.0 / math.sqrt(d) if sm_scale is None else sm_scale) * _LOG2E
    last_stride = 0 if last.numel() == 1 else last.stride(0)
    _split_kernel[(b * nkv, cfg.num_splits)](
        q, k, v, last, start if start is not None else last, k_scale if fp8 else q, v_scale if fp8 else q,
        partial, lse, out, q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0),
        v.stride(1), v.stride(2), out.stride(0), out.stride(1), last_stride, scale, nkv,
        GROUP=group, HEAD_DIM=d, BLOCK_G=_pow2(group), BLOCK_D=_pow2(d), BLOCK_N=cfg.block_n,
        NUM_SPLITS=cfg.num_splits, HAS_START=start is not None, FP8=fp8, IEEE=q.dtype == torch.float32 or _INTERPRET,
        DIRECT=direct, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if not direct:
        _merge_kernel[(b * nq,)](partial, lse, out, out.stride(0), out.stride(1), nq, HEAD_DIM=d, BLOCK_D=_pow2(d),
                                 NUM_SPLITS=cfg.num_splits, BLOCK_S=_pow2(cfg.num_splits, least=2), num_warps=4)
    return out
