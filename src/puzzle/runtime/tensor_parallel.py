"""Tensor-parallel (Megatron-style) sharding of a Puzzle child for inference across `world` ranks.

`shard_model(model, rank, world)` returns a copy of the model whose sub-blocks hold only this rank's slice
of the weights; each rank runs the same `forward` on the same tokens and, after the all-reduces, gets the
full logits. Sharding rules per sub-block (Nq/Nkv heads, D head_dim, H hidden, I intermediate):
  - GQA attention: query heads split evenly (Nq % world == 0 is required), rank r owns heads
    [r*Nq/world, (r+1)*Nq/world). KV heads: when Nkv % world == 0, rank r owns KV heads
    [r*Nkv/world, (r+1)*Nkv/world), exactly those its query heads read; otherwise each rank keeps (a copy
    of) every KV head its query heads read, so some KV heads are replicated. q/k/v are column-parallel;
    o_proj is row-parallel over this rank's heads, then all-reduce (sum).
  - SwiGLU FFN: gate/up column-parallel, down row-parallel (I % world == 0), then all-reduce.
  - Linear attention / linear FFN (one H x H matrix): row-parallel over input features (H % world == 0),
    then all-reduce.
  - No-op sub-blocks: nothing. Any other (registered) FFN kind stays whole on every rank: correct, not split.
  - Embeddings, norms, RoPE and the LM head are replicated.
Only the plain `PuzzleModel.forward` (full-sequence logits) is sharded; the runtime engine's KV-cached
decode is not. The collective is `torch.distributed.all_reduce` on the given group (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from puzzle.core.errors import PuzzleError
from puzzle.model.decoder import GQAAttention, LinearAttention, LinearFFN, PuzzleModel, SwiGLU, apply_rope


def _split(n: int, rank: int, world: int) -> slice:
    size = n // world
    return slice(rank * size, (rank + 1) * size)


def _copy_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_f, in_f = weight.shape
    layer = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _rows(layer: nn.Linear, rows: slice | torch.Tensor) -> nn.Linear:
    """Column-parallel slice: output features `rows` (bias sliced with them)."""
    bias = layer.bias[rows] if layer.bias is not None else None
    return _copy_linear(layer.weight[rows], bias)


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


class RowParallelLinear(nn.Module):
    """y = x W^T with W [out, in] split over input features: x[..., cols] @ W[:, cols]^T, summed over ranks"""

    def __init__(self, layer: nn.Linear, rank: int, world: int, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        assert layer.bias is None, "row-parallel layers here carry no bias"
        self.cols = _split(layer.in_features, rank, world)
        self.weight = nn.Parameter(layer.weight[:, self.cols].detach().clone(), requires_grad=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [B, T, H] (full, replicated) -> [B, T, out] full after the all-reduce
        return _all_reduce(F.linear(x[..., self.cols], self.weight), self.group)


class ShardedGQAAttention(nn.Module):
    """This rank's query heads, the KV heads they read, and its rows of o_proj; all-reduce at the end."""

    def __init__(self, op: GQAAttention, rank: int, world: int, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        nq, nkv, d = op.num_heads, op.num_kv_heads, op.head_dim
        group_size = nq // nkv
        q_heads = range(*_split(nq, rank, world).indices(nq))
        kv_first, kv_last = q_heads[0] // group_size, q_heads[-1] // group_size
        self.num_heads, self.num_kv_heads, self.head_dim = len(q_heads), kv_last - kv_first + 1, d
        # local query head j reads local KV head kv_index[j]; the identity pattern (Nkv % world == 0) is the
        # usual repeat_interleave, the replicated one may be uneven (e.g. Nq=6, Nkv=3, world=2: 0,0,1 | 1,2,2)
        self.register_buffer("kv_index", torch.tensor([q // group_size - kv_first for q in q_heads],
                                                      device=op.q_proj.weight.device), persistent=False)
        q_rows = slice(q_heads[0] * d, (q_heads[-1] + 1) * d)
        kv_rows = slice(kv_first * d, (kv_last + 1) * d)
        self.q_proj = _rows(op.q_proj, q_rows)
        self.k_proj, self.v_proj = _rows(op.k_proj, kv_rows), _rows(op.v_proj, kv_rows)
        self.o_proj = _copy_linear(op.o_proj.weight[:, q_rows], None)
        self.group = group

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, H] -> [B, T, H], summed over ranks."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # [B, nq, T, D]
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, nkv, T, D]
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = k.index_select(1, self.kv_index), v.index_select(1, self.kv_index)  # [B, nq, T, D]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
        out = self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
        return _all_reduce(out, self.group)


class ShardedSwiGLU(nn.Module):
    """gate/up column-parallel, down row-parallel over the intermediate features; all-reduce at the end."""

    def __init__(self, op: SwiGLU, rank: int, world: int, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        cols = _split(op.gate_proj.out_features, rank, world)
        self.gate_proj, self.up_proj = _rows(op.gate_proj, cols), _rows(op.up_proj, cols)
        self.down_proj = _copy_linear(op.down_proj.weight[:, cols], None)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [B, T, H] -> [B, T, I/world] -> [B, T, H] summed over ranks
        return _all_reduce(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)), self.group)


def check_tensor_parallel(model: PuzzleModel, world: int) -> None:
    """Raise a one-line PuzzleError when `world` ranks cannot split this model's sub-blocks evenly."""
    config = model.config
    if world < 1:
        raise PuzzleError(f"tensor-parallel world size must be at least 1, got {world}")
    if config.num_attention_heads % world:
        raise PuzzleError(f"tensor parallelism over {world} ranks needs the query heads "
                          f"({config.num_attention_heads}) divisible by {world}; "
                          "use a world size that divides them")
    for i, layer in enumerate(model.layers):
        ops = [block.op for block in (layer.attention, layer.ffn) if block is not None]
        for op in ops:
            if isinstance(op, (LinearAttention, LinearFFN)) and config.hidden_size % world:
                raise PuzzleError(f"layer {i}: a linear sub-block needs hidden_size ({config.hidden_size}) "
                                  f"divisible by the tensor-parallel world size {world}; "
                                  "use a world size that divides it")
            if isinstance(op, SwiGLU) and op.gate_proj.out_features % world:
                raise PuzzleError(f"layer {i}: SwiGLU intermediate size {op.gate_proj.out_features} is not "
                                  f"divisible by the tensor-parallel world size {world}; "
                                  "use a world size that divides it")


def _shard_op(op: nn.Module, rank: int, world: int, group: dist.ProcessGroup | None) -> nn.Module:
    if isinstance(op, GQAAttention):
        return ShardedGQAAttention(op, rank, world, group)
    if isinstance(op, SwiGLU):
        return ShardedSwiGLU(op, rank, world, group)
    if isinstance(op, LinearAttention):
        # keeps LinearAttention's call signature (x, cos, sin) and its parameter name
        return _LinearAttentionShard(RowParallelLinear(op.linear_attn, rank, world, group))
    if isinstance(op, LinearFFN):
        return RowParallelLinear(op.linear_mlp, rank, world, group)
    return op  # other FFN kinds: replicated whole


class _LinearAttentionShard(nn.Module):
    def __init__(self, linear: RowParallelLinear) -> None:
        super().__init__()
        self.linear_attn = linear

    def forward(self, x: torch.Tensor, *_: object, **__: object) -> torch.Tensor:
        return self.linear_attn(x)


@torch.no_grad()
def shard_model(model: PuzzleModel, rank: int, world: int,
                group: dist.ProcessGroup | None = None) -> PuzzleModel:
    """A copy of `model` holding rank `rank`'s tensor-parallel slice of every sub-block (rules: module doc).

    Every rank must call it with the same weights; the copy's `forward` all-reduces over `group` (default:
    the world group) and returns the full logits on every rank. `world == 1` returns an unsharded copy.
    """
    check_tensor_parallel(model, world)
    if not 0 <= rank < world:
        raise PuzzleError(f"tensor-parallel rank {rank} is outside 0..{world - 1}")
    sharded = copy.deepcopy(model)
    if world == 1:
        return sharded
    for layer in sharded.layers:
        for block in (layer.attention, layer.ffn):
            if block is not None:
                block.op = _shard_op(block.op, rank, world, group)
    return sharded
