"""Batch-1 matrix-vector products of the decode step, with the residual add and RMSNorm fused in (Triton).

At batch 1 every projection is a GEMV that must stream its whole weight matrix from memory: the step is
as fast as those reads. `norm_gemv` computes, in one kernel,
    h' = h + update                      (the pending residual add; written out once)
    x  = RMSNorm(h') * norm_weight       (rounded like `puzzle.model.decoder.RMSNorm`)
    y  = W x            or, with glu=True and W = [gate; up],  y = silu(W_gate x) * (W_up x)
Each program owns BLOCK_N output rows and streams their [BLOCK_N, K] slice of W; the norm's statistics are
recomputed per program from the (cached) hidden vector, so no second kernel or grid-wide sync is needed.

Why by hand: inductor's coordinate-descent tuning makes similar kernels, but its choice of tile sizes moves
from one compile to the next (benchmarks/results/tuning_stability.json: 5-25% per kernel on the H200), so a
child's decode step, and every per-block cost measured for the search, changed with each compile. Here the
launch configuration is a fixed function of the shape (`gemv_config`), chosen from the sweep in
benchmarks/gemv_sweep.py: the same kernels run in the cost measurement and in serving.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the runtime falls back to compiled torch code
    triton = None


def available(device: torch.device) -> bool:
    """Whether the Triton kernels can run for tensors on `device` (CUDA, Triton installed)."""
    return triton is not None and device.type == "cuda"


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def gemv_config(n: int, k: int, glu: bool = False) -> GemvConfig:
    """Launch configuration for an [n, k] weight (n output rows): a fixed rule, never timed at run time.

    From benchmarks/results/gemv_sweep.json (H200, every 8B decode shape, 48 configurations each): 1024-wide
    K tiles, 4 warps, 3 stages everywhere; 8 rows per program (4 with glu, which streams gate and up rows).
    Within 5% of the sweep's best for gate/up, down and the head; up to 22% off for o_proj (16 rows best).
    """
    return GemvConfig(block_n=4 if glu else 8, block_k=min(1024, _next_pow2(k)), num_warps=4, num_stages=3)


def _next_pow2(n: int) -> int:
    return 1 << max(4, (n - 1).bit_length())


if triton is not None:

    @triton.jit
    def _hidden(h_ptr, u_ptr, offs, m, HAS_UPDATE: tl.constexpr):
        """h[offs] (+ update[offs], rounded to h's dtype as torch's add would): the residual stream's values."""
        x = tl.load(h_ptr + offs, mask=m, other=0.0)
        if HAS_UPDATE:
            x = (x.to(tl.float32) + tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)).to(h_ptr.dtype.element_ty)
        return x

    @triton.jit
    def _norm_gemv_kernel(h_ptr, u_ptr, h_out_ptr, nw_ptr, w_ptr, y_ptr, N, K, eps,
                          HAS_UPDATE: tl.constexpr, HAS_NORM: tl.constexpr, GLU: tl.constexpr, WIDE: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_K)
        rstd = 1.0
        if HAS_NORM:
            sq = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                x = _hidden(h_ptr, u_ptr, k0 + cols, k0 + cols < K, HAS_UPDATE).to(tl.float32)
                sq += x * x
            rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / K + eps)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        # 64-bit offsets only where a weight has 2^31+ elements (a large vocabulary's head): they cost ~10%
        row_start = rows.to(tl.int64) * K if WIDE else rows * K
        up_start = N.to(tl.int64) * K if WIDE else N * K  # glu: where the up rows begin
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        if GLU:
            acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            m = k0 + cols < K
            x = _hidden(h_ptr, u_ptr, k0 + cols, m, HAS_UPDATE)
            if HAS_UPDATE:  # noqa: SIM102  (nested: a constexpr test, then a runtime one, for Triton)
                if pid == 0:  # one program writes h + update out
                    tl.store(h_out_ptr + k0 + cols, x, mask=m)
            if HAS_NORM:  # as RMSNorm: normalise in fp32, round, then scale (rounded again)
                x = (x.to(tl.float32) * rstd).to(h_ptr.dtype.element_ty)
                x = (x.to(tl.float32) * tl.load(nw_ptr + k0 + cols, mask=m, other=0.0).to(tl.float32)
                     ).to(h_ptr.dtype.element_ty)
            x = x.to(tl.float32)[None, :]
            tile = row_start[:, None] + k0 + cols[None, :]
            tile_ok = row_ok[:, None] & m[None, :]
            acc += tl.load(w_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32) * x
            if GLU:
                acc_up += tl.load(w_ptr + up_start + tile, mask=tile_ok, other=0.0).to(tl.float32) * x
        y = tl.sum(acc, axis=1)
        if GLU:  # silu(gate) * up, each rounded like torch's bf16 ops
            gate = y.to(y_ptr.dtype.element_ty).to(tl.float32)
            up = tl.sum(acc_up, axis=1).to(y_ptr.dtype.element_ty).to(tl.float32)
            y = (gate / (1.0 + tl.exp(-gate))).to(y_ptr.dtype.element_ty).to(tl.float32) * up
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


def norm_gemv(x: torch.Tensor, weight: torch.Tensor, update: torch.Tensor | None = None,
              norm_weight: torch.Tensor | None = None, eps: float = 1e-5, glu: bool = False,
              config: GemvConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [1, 1, K] (+ update) -> (h' [1, 1, K], y [1, 1, N]); weight [N, K] or, with glu, [2N, K] = [gate; up].

    h' is x + update (x itself when update is None); norm_weight None skips the norm.
    """
    k = x.shape[-1]
    rows = weight.shape[0] // 2 if glu else weight.shape[0]
    assert x.numel() == k and weight.shape[1] == k and weight.is_contiguous(), "batch-1 GEMV on a [N, K] weight"
    cfg = config or gemv_config(rows, k, glu)
    h_out = torch.empty_like(x) if update is not None else x
    y = torch.empty(*x.shape[:-1], rows, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(rows, cfg.block_n),)
    _norm_gemv_kernel[grid](
        x, update if update is not None else x, h_out, norm_weight if norm_weight is not None else x, weight, y,
        rows, k, eps, HAS_UPDATE=update is not None, HAS_NORM=norm_weight is not None, GLU=glu, WIDE=weight.numel() >= 2**31,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return h_out, y
