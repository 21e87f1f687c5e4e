"""FP8 (e4m3) linear layers for serving at the deployment precision of the Puzzle paper (FP8 weights and
activations; the FP8 KV cache lives in `puzzle.runtime.kv_cache`).

- Weights are quantized once to float8_e4m3fn with one fp32 scale per output channel (row of W [N, K]).
- Activations are quantized on the fly with one fp32 scale per token (row of x [M, K]).
- y = (x_q @ W_q^T) * s_x * s_w, accumulated in fp32 and rounded to the activations' dtype; bias after.
On CUDA with compute capability >= 8.9 (Ada, Hopper) the product is `torch._scaled_mm` on the FP8 tensor cores:
row-wise scales in the kernel where this torch supports them, otherwise per-tensor unit scales in the kernel
and the row/column scales applied after (same values, one more elementwise op). Elsewhere (CPU, older GPUs,
shapes the kernel refuses) both operands are dequantized to fp32 and multiplied: the same quantization, so CPU
tests see the numbers a GPU serves (up to fp32 summation order).
Embeddings, norms and the LM head stay in the model's dtype, as serving engines keep them.

`torch._scaled_mm(mat1, mat2, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None,
use_fast_accum=False)` has this schema in torch 2.11 and 2.13 alike (superseded by `_scaled_mm_v2` /
`F.scaled_mm`, kept for backward compatibility). mat2 must be column-major (W^T of a row-major W is); row-wise
scaling needs 2-D fp32 scales, [M, 1] and [1, N], and a bf16 output; per-tensor scaling takes 0-d scales.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from puzzle.core.errors import PuzzleError
from puzzle.model.decoder import GQAAttention, PuzzleModel, SwiGLU
from puzzle.runtime.fusion import drop_fused

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # largest finite e4m3 value
_TINY = 1e-12  # floor of an amax, so an all-zero row gets a finite scale (and quantizes to zeros)
KERNELS = ("rowwise", "tensor", "dequant")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (e4m3 [..., K], fp32 scale [..., 1]) with x ~= q * scale, one scale per row."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=_TINY) / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def quantize_tensor(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x -> e4m3 with a given fp32 scale (any shape broadcasting against x); saturates at +-448."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def _mm_rowwise(xq: torch.Tensor, sx: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor, dtype: torch.dtype
                ) -> torch.Tensor:
    # scale_a [M, 1], scale_b [1, N] (fp32): row-wise scaling inside the kernel (bf16 output only)
    return torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw.view(1, -1), out_dtype=dtype)


def _mm_tensor(xq: torch.Tensor, sx: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor, dtype: torch.dtype
               ) -> torch.Tensor:
    one = torch.ones((), dtype=torch.float32, device=xq.device)  # per-tensor unit scales; real ones after
    y = torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    return (y * sx * sw).to(dtype)


def _mm_dequant(xq: torch.Tensor, sx: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor, dtype: torch.dtype
                ) -> torch.Tensor:
    return ((xq.float() @ wq.float().t()) * sx * sw).to(dtype)


_MM = {"rowwise": _mm_rowwise, "tensor": _mm_tensor, "dequant": _mm_dequant}


@functools.cache
def _device_kernel(device: str) -> str:
    """The best FP8 product this torch runs on `device`: found once by trying it on a small problem."""
    dev = torch.device(device)
    if dev.type != "cuda" or torch.cuda.get_device_capability(dev) < (8, 9):
        return "dequant"
    x = torch.randn(16, 32, device=dev)
    w = torch.randn(16, 32, device=dev)
    (xq, sx), (wq, sw) = quantize_rows(x), quantize_rows(w)
    want = _mm_dequant(xq, sx, wq, sw.view(-1), torch.bfloat16).float()
    for kernel in ("rowwise", "tensor"):
        try:
            got = _MM[kernel](xq, sx, wq, sw.view(-1), torch.bfloat16).float()
        except (RuntimeError, NotImplementedError, TypeError):  # not in this torch / on this device
            continue
        if torch.allclose(got, want, rtol=2e-2, atol=1e-2):
            return kernel
    return "dequant"


def kernel_for(device: torch.device, n: int, k: int) -> str:
    """The product an [n, k] FP8 weight on `device` uses ("rowwise", "tensor" or "dequant")."""
    if n % 16 or k % 16:  # cuBLASLt's FP8 GEMM needs both dims divisible by 16
        return "dequant"
    return _device_kernel(str(device))


class Fp8Linear(nn.Module):
    """y = x W^T (+ b) with W in e4m3 (per-output-channel scales) and x quantized per token."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 persistent: bool = True, kernel: str | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight, persistent=persistent)  # [N, K] e4m3
        self.register_buffer("weight_scale", scale, persistent=persistent)  # [N] fp32
        self.register_buffer("bias", bias, persistent=persistent)  # [N] in the compute dtype, or None
        self.kernel = kernel or kernel_for(weight.device, *weight.shape)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        with torch.no_grad():
            wq, sw = quantize_rows(linear.weight.detach())
            bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(wq, sw.view(-1), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] in x's dtype."""
        lead = x.shape[:-1]
        xq, sx = quantize_rows(x.reshape(-1, self.in_features))  # [M, K] e4m3, [M, 1]
        kernel = "tensor" if self.kernel == "rowwise" and x.dtype != torch.bfloat16 else self.kernel  # bf16 only
        y = _MM[kernel](xq, sx, self.weight, self.weight_scale, x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


def _fuse(parts: list[Fp8Linear]) -> Fp8Linear:
    """One Fp8Linear over the parts' rows (exact: the scales are per row); the parts become views of it, so
    the fused module costs no memory (its buffers are non-persistent, like `puzzle.runtime.fusion`'s)."""
    biases = [p.bias for p in parts]
    fused = Fp8Linear(torch.cat([p.weight for p in parts]), torch.cat([p.weight_scale for p in parts]),
                      None if biases[0] is None else torch.cat(biases), persistent=False)
    start = 0
    for p in parts:
        rows = slice(start, start + p.out_features)
        p.weight, p.weight_scale = fused.weight[rows], fused.weight_scale[rows]
        if p.bias is not None:
            p.bias = fused.bias[rows]
        start += p.out_features
    return fused


def quantize_fp8(model: PuzzleModel, fuse: bool | None = None) -> PuzzleModel:
    """Every nn.Linear inside the decoder layers -> Fp8Linear, in place (embeddings, norms, LM head untouched).

    fuse: also give each GQA op a `qkv_fp8` and each SwiGLU a `gate_up_fp8` (one FP8 GEMM for q/k/v, one for
    gate/up), which the runtime uses when present; None = on CUDA only. Quantize after moving the model to
    its device: `.to()` afterwards turns the parts' views of the fused weights into copies.
    """
    if has_fp8(model):
        raise PuzzleError("the model is already FP8; quantize a bf16/fp32 model once")
    device = model.embed_tokens.weight.device
    fuse = device.type == "cuda" if fuse is None else fuse
    for module in list(model.layers.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Fp8Linear.from_linear(child))
        drop_fused(module)  # stale bf16 fusions of the replaced linears
        if fuse and isinstance(module, GQAAttention):
            module.qkv_fp8 = _fuse([module.q_proj, module.k_proj, module.v_proj])
        elif fuse and isinstance(module, SwiGLU):
            module.gate_up_fp8 = _fuse([module.gate_proj, module.up_proj])
    return model


def has_fp8(model: nn.Module) -> bool:
    """Whether any of the model's linear layers is FP8."""
    return any(isinstance(m, Fp8Linear) for m in model.modules())


def fp8_weight_bytes(model: nn.Module) -> int:
    """Bytes of the FP8 weights and their scales, each stored once (fused buffers are views of nothing new)."""
    seen: set[int] = set()
    total = 0
    for m in model.modules():
        if isinstance(m, Fp8Linear):
            for t in (m.weight, m.weight_scale):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in seen:
                    seen.add(ptr)
                    total += t.untyped_storage().nbytes()
    return total
