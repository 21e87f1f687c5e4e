"""Fused projection weights for decoding: one GEMV for q/k/v and one for gate/up, at no extra memory.

At batch 1 a decode step is a chain of matrix-vector products, and small ones (k_proj, v_proj: 8 MB at
Llama-3.1-8B's shape) run far below the memory bandwidth and each pay a kernel launch. Concatenating q/k/v
(and gate/up) into one matrix turns 3 (2) GEMVs into one. The fused matrix is a non-persistent buffer of
the projection module, and the original `q_proj.weight` etc. become row views of it, so:
- memory stays the same (the views share the fused storage),
- the modules, `state_dict()` keys and values, and training updates all keep working unchanged,
- a compiled region sees the fused matrix as a lifted input, like any parameter (one graph per shape).
Moving or casting the model afterwards (`model.to(...)`) turns the views into separate tensors again;
`fuse_projections` notices that (`is_fused` is False) and fuses anew.
"""

from __future__ import annotations

import torch
from torch import nn

from puzzle.model.decoder import GQAAttention, PuzzleModel, SwiGLU


def _fuse(module: nn.Module, parts: list[nn.Linear], name: str) -> None:
    """Concatenate the parts' weights (and biases) along rows into buffer `name`; rebind them as views."""
    with torch.no_grad():
        for attr, tensors in (("weight", [p.weight for p in parts]), ("bias", [p.bias for p in parts])):
            if tensors[0] is None:
                continue
            fused = torch.cat([t.detach() for t in tensors])  # [sum(out_i), in] (or [sum(out_i)])
            module.register_buffer(f"{name}_{attr}", fused, persistent=False)
            start = 0
            for part, t in zip(parts, tensors):
                rows = t.shape[0]
                setattr(part, attr, nn.Parameter(fused[start:start + rows], requires_grad=t.requires_grad))
                start += rows


def _views_of(fused: torch.Tensor | None, parts: list[torch.Tensor]) -> bool:
    if fused is None:
        return False
    start = 0
    for t in parts:
        if t.untyped_storage().data_ptr() != fused.untyped_storage().data_ptr() or \
                t.data_ptr() != fused[start:].data_ptr():
            return False
        start += t.shape[0]
    return start == fused.shape[0]


def is_fused(module: nn.Module) -> bool:
    """True when the module's fused buffer is current (its projections are still views of it)."""
    if isinstance(module, GQAAttention):
        return _views_of(getattr(module, "qkv_weight", None),
                         [module.q_proj.weight, module.k_proj.weight, module.v_proj.weight])
    if isinstance(module, SwiGLU):
        return _views_of(getattr(module, "gate_up_weight", None), [module.gate_proj.weight, module.up_proj.weight])
    return False


_FUSED_BUFFERS = ("qkv_weight", "qkv_bias", "gate_up_weight")


def drop_fused(module: nn.Module) -> None:
    """Remove the module's fused q/k/v and gate/up buffers, if any: they are views of the projections as they
    were, so whatever replaces or re-slices a projection (FP8 quantization, tensor-parallel sharding, a fresh
    fusion) drops them, or the runtime would read stale weights. The projections keep their own weights."""
    for name in _FUSED_BUFFERS:
        module._buffers.pop(name, None)


def fuse_projections(model: PuzzleModel, fuse: bool = True) -> PuzzleModel:
    """Give every GQA op a `qkv_weight` (+ `qkv_bias`) and every SwiGLU a `gate_up_weight` (those with FP8
    projections excepted: they fuse their own way); idempotent.

    fuse=False fuses nothing new but drops fused buffers that are no longer current, so the runtime (which
    uses a fused buffer whenever one exists) can never read stale weights.
    """
    for module in model.modules():
        if not isinstance(module, (GQAAttention, SwiGLU)) or is_fused(module):
            continue
        if not isinstance(getattr(module, "q_proj", getattr(module, "gate_proj", None)), nn.Linear):
            continue  # FP8 projections fuse their own way (`puzzle.runtime.fp8`)
        drop_fused(module)
        if fuse and isinstance(module, GQAAttention):
            _fuse(module, [module.q_proj, module.k_proj, module.v_proj], "qkv")
        elif fuse:
            _fuse(module, [module.gate_proj, module.up_proj], "gate_up")
    return model
