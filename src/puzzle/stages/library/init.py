"""Initialising variants from the parent, as in the Puzzle paper.

- fewer KV heads: fitted to the parent's heads and input covariance (`kv_init.py`, the default), or mean-pool
  the K and V projections of each group of consecutive parent KV heads (the paper's);
- smaller SwiGLU: keep the intermediate channels with the largest measured contribution
  mean|silu(gate) * up| x ||down_proj column|| on calibration tokens (kept in their original order);
- linear: ridge least squares from the sub-block's normalised input to its output on calibration tokens;
- any other registered FFN kind: its spec's `init(parent, child)`, if it has one (`puzzle.model.kinds`), else the
  module's own initialisation; BLD trains it from there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from puzzle.core.errors import PuzzleError
from puzzle.model.blocks import AttentionConfig, FFNConfig, ModelConfig
from puzzle.model.decoder import AttentionBlock, FFNBlock, build_attention_block, build_ffn_block
from puzzle.model.kinds import ffn_kind
from puzzle.stages.library.kv_init import pca_kv_init

STATS_FFN_KINDS = ("swiglu", "linear")  # the kinds initialised from calibration statistics (below)


@dataclass
class CalibrationStats:
    """Streaming sums over calibration tokens for one sub-block of one layer (fp64 for the normal equations)."""

    xtx: torch.Tensor | None = None  # [H, H]  sum of x^T x, x = normalised sub-block input
    xty: torch.Tensor | None = None  # [H, H]  sum of x^T y, y = sub-block output
    act_abs: torch.Tensor | None = None  # [I]  sum of |silu(gate) * up| (SwiGLU only)
    tokens: int = 0

    def add_linear(self, x: torch.Tensor, y: torch.Tensor) -> None:
        # x, y [B, T, H] -> flattened [N, H]
        self.add_covariance(x)
        x2 = x.reshape(-1, x.shape[-1]).double()
        y2 = y.reshape(-1, y.shape[-1]).double()
        self.xty = x2.T @ y2 if self.xty is None else self.xty + x2.T @ y2

    def add_covariance(self, x: torch.Tensor) -> None:
        """x^T x alone (x [B, T, H]): what the fewer-KV-head fit reads."""
        x2 = x.reshape(-1, x.shape[-1]).double()
        self.xtx = x2.T @ x2 if self.xtx is None else self.xtx + x2.T @ x2

    def add_activations(self, act: torch.Tensor) -> None:
        # act [B, T, I]
        s = act.reshape(-1, act.shape[-1]).abs().double().sum(0)
        self.act_abs = s if self.act_abs is None else self.act_abs + s


def swiglu_activations(block: FFNBlock, h: torch.Tensor) -> torch.Tensor:
    """The parent FFN's intermediate activations silu(gate(x)) * up(x), [B, T, I], for input h [B, T, H]."""
    x = block.norm(h)
    return F.silu(block.op.gate_proj(x)) * block.op.up_proj(x)


def ridge_fit(xtx: torch.Tensor, xty: torch.Tensor, ridge: float) -> torch.Tensor:
    """W [H_out, H_in] minimising ||x W^T - y||^2 + lam ||W||^2, lam = ridge * mean diagonal of x^T x."""
    n = xtx.shape[0]
    lam = ridge * float(xtx.diagonal().mean()) + 1e-12
    a = xtx + lam * torch.eye(n, dtype=xtx.dtype, device=xtx.device)
    return torch.linalg.solve(a, xty).T  # [H_out, H_in]


def channel_scores(parent: FFNBlock, stats: CalibrationStats) -> torch.Tensor:
    """Contribution of each intermediate channel: mean |activation| x ||down_proj column||, [I]."""
    if stats.act_abs is None or stats.tokens == 0:
        raise PuzzleError("FFN channel selection needs calibration tokens; set library.init_batches >= 1")
    col_norm = parent.op.down_proj.weight.detach().double().norm(dim=0)  # [I]
    return stats.act_abs.to(col_norm.device) / stats.tokens * col_norm


def kv_head_mixing(num_heads: int, parent_kv: int, child_kv: int) -> torch.Tensor:
    """[child_kv, parent_kv] weights: child KV head j is the mean of the parent KV heads that served its query heads.

    Child head j serves query heads [j * Q/child_kv, (j+1) * Q/child_kv); query head q was served by parent head
    q // (Q/parent_kv). With child_kv dividing parent_kv this is the mean of consecutive parent heads; it also
    covers counts that divide only the query heads (2 of 5 KV heads for 20 query heads).
    """
    served_by_parent = torch.arange(num_heads) // (num_heads // parent_kv)  # [Q]
    served_by_child = torch.arange(num_heads) // (num_heads // child_kv)  # [Q]
    mix = torch.zeros(child_kv, parent_kv)
    mix.index_put_((served_by_child, served_by_parent), torch.ones(num_heads), accumulate=True)
    return mix / mix.sum(1, keepdim=True)


def init_attention(parent: AttentionBlock, variant: AttentionConfig, model: ModelConfig,
                   stats: CalibrationStats | None, ridge: float, kv_init: str) -> AttentionBlock | None:
    """A new attention sub-block initialised from the parent's (fp32, on the parent's device); fewer KV heads by
    `kv_init`: "mean" pools the merged heads, "pca" fits them (`kv_init.py`; needs the input covariance); no
    default, so that every caller passes `library.kv_init` rather than a different init by omission."""
    if variant.kind == "no_op":
        return None
    device = parent.norm.weight.device
    with torch.device(device):
        child = build_attention_block(model, variant)
    child = child.float()
    with torch.no_grad():
        child.norm.weight.copy_(parent.norm.weight)
        if variant.kind == "linear":
            if stats is None or stats.xtx is None:
                raise PuzzleError("linear attention init needs calibration tokens; set library.init_batches >= 1")
            child.op.linear_attn.weight.copy_(ridge_fit(stats.xtx, stats.xty, ridge))
            return child
        p, c = parent.op, child.op
        if kv_init == "pca" and c.num_kv_heads < p.num_kv_heads:
            if stats is None or stats.xtx is None:
                raise PuzzleError("kv_init=pca needs calibration tokens; set library.init_batches >= 1 "
                                  "or library.kv_init=mean")
            pca_kv_init(p, c, stats.xtx, ridge)
            return child
        c.q_proj.load_state_dict(p.q_proj.state_dict())
        c.o_proj.load_state_dict(p.o_proj.state_dict())
        mix = kv_head_mixing(p.num_heads, p.num_kv_heads, c.num_kv_heads).to(device)  # [Nkv', Nkv]
        for name in ("k_proj", "v_proj"):
            src, dst = getattr(p, name), getattr(c, name)
            w = torch.einsum("cp,pdh->cdh", mix, src.weight.float().view(p.num_kv_heads, p.head_dim, -1))
            dst.weight.copy_(w.reshape(dst.weight.shape))  # [Nkv' * D, H]
            if src.bias is not None:
                b = mix @ src.bias.float().view(p.num_kv_heads, p.head_dim)  # [Nkv', D]
                dst.bias.copy_(b.reshape(-1))
    return child


def init_ffn(parent: FFNBlock, variant: FFNConfig, model: ModelConfig,
             stats: CalibrationStats | None, ridge: float) -> FFNBlock | None:
    if variant.kind == "no_op":
        return None
    device = parent.norm.weight.device
    with torch.device(device):
        child = build_ffn_block(model, variant)
    child = child.float()
    with torch.no_grad():
        child.norm.weight.copy_(parent.norm.weight)
        if variant.kind == "linear":
            if stats is None or stats.xtx is None:
                raise PuzzleError("linear FFN init needs calibration tokens; set library.init_batches >= 1")
            child.op.linear_mlp.weight.copy_(ridge_fit(stats.xtx, stats.xty, ridge))
            return child
        if variant.kind != "swiglu":
            init = ffn_kind(variant.kind).init
            if init is not None:
                init(parent, child)
            return child
        n, full = variant.intermediate_size, parent.op.gate_proj.weight.shape[0]
        if n == full:
            keep = torch.arange(full, device=device)
        else:
            keep = channel_scores(parent, stats).topk(n).indices.sort().values.to(device)
        child.op.gate_proj.weight.copy_(parent.op.gate_proj.weight[keep])
        child.op.up_proj.weight.copy_(parent.op.up_proj.weight[keep])
        child.op.down_proj.weight.copy_(parent.op.down_proj.weight[:, keep])
    return child

