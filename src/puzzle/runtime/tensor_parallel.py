"""Tensor-parallel (Megatron-style) sharding of a Puzzle child for inference across `world` ranks.

`shard_model(model, rank, world)` returns a copy of the model whose sub-blocks hold only this rank's slice
of the weights; each rank runs the same `forward` on the same tokens and, after the all-reduces, gets the
full logits. Sharding rules per sub-block (Nq/Nkv heads, D head_dim, H hidden, I intermediate):
  - GQA attention: query heads split evenly (Nq % world == 0 is required), rank r owns heads
    [r*Nq/world, (r+1)*Nq/world). KV heads: when Nkv % world == 0, rank r owns KV heads
    [r*Nkv/world, (r+1)*Nkv/world), exactly those its query heads read; otherwise, when the local grouping is
    uneven, each local query head gets its own copy of its KV head (`_kv_heads`). q/k/v are
    column-parallel; o_proj is row-parallel over this rank's heads, then all-reduce (sum).
  - SwiGLU FFN: gate/up column-parallel, down row-parallel (I % world == 0), then all-reduce.
  - Linear attention / linear FFN (one H x H matrix): row-parallel over input features (H % world == 0),
    then all-reduce.
  - No-op sub-blocks: nothing. Any other (registered) FFN kind stays whole on every rank: correct, not split.
  - Embeddings, norms, RoPE and the LM head are replicated.
The sharded ops stay GQAAttention / SwiGLU / linear modules with fewer heads or features (the row-parallel
layers all-reduce inside their forward), so both `PuzzleModel.forward` and the runtime engine run them
unchanged: `tensor_parallel_engine` builds an engine whose static KV cache holds only this rank's KV heads
(the copy's config lists them per layer). The collective is `torch.distributed.all_reduce` on the given
group (gloo on CPU, NCCL on GPU); every rank must feed the same tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from puzzle.core.errors import PuzzleError
from puzzle.model.blocks import AttentionConfig, BlockConfig, ModelConfig
from puzzle.model.decoder import GQAAttention, LinearAttention, LinearFFN, PuzzleModel, SwiGLU
from puzzle.runtime.engine import Engine, GraphMode
from puzzle.runtime.fusion import drop_fused


def _split(n: int, rank: int, world: int) -> slice:
    size = n // world
    return slice(rank * size, (rank + 1) * size)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, cls: type[nn.Linear] = nn.Linear,
            **extra: object) -> nn.Linear:
    """A `cls` layer holding copies of weight [out, in] (and bias [out])."""
    out_f, in_f = weight.shape
    layer = cls(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype, **extra)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _rows(layer: nn.Linear, rows: torch.Tensor | slice) -> nn.Linear:
    """Column-parallel slice: output features `rows` (index [n] or slice; bias sliced with them)."""
    return _linear(layer.weight[rows], layer.bias[rows] if layer.bias is not None else None)


class AllReduceLinear(nn.Linear):
    """Row-parallel layer: this rank's partial product x @ W_local^T, summed over the group's ranks.

    x_slice: when set, the layer takes the full input and multiplies only x[..., x_slice] (the rank's input
    features); otherwise the input is already this rank's slice (attention heads, SwiGLU intermediates).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device: object = None,
                 dtype: torch.dtype | None = None, group: dist.ProcessGroup | None = None,
                 x_slice: slice | None = None) -> None:
        assert not bias, "a bias would be summed once per rank"
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.group, self.x_slice = group, x_slice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [B, T, in_local] (or [B, T, in] with x_slice) -> [B, T, out], full after the all-reduce
        out = F.linear(x if self.x_slice is None else x[..., self.x_slice], self.weight)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out


def _head_rows(heads: list[int], d: int, device: torch.device) -> torch.Tensor:
    """Weight rows [len(heads) * D] of the given heads, in order."""
    return torch.tensor([h * d + i for h in heads for i in range(d)], dtype=torch.long, device=device)


def _kv_heads(num_heads: int, num_kv_heads: int, rank: int, world: int) -> tuple[list[int], list[int]]:
    """(this rank's query heads, the KV heads it keeps, in cache order).

    Local query head j reads local KV head j // (len(q) // len(kv)). The KV heads the rank's query heads
    read are kept once each when that grouping is even (always when Nkv % world == 0); when it is not
    (e.g. Nq=6, Nkv=3, world=2 reads KV 0,0,1 | 1,2,2) every local query head gets its own copy of its KV
    head, so the shard is plain multi-head attention with a larger cache.
    """
    group = num_heads // num_kv_heads
    q_heads = list(range(num_heads))[_split(num_heads, rank, world)]
    reads = [q // group for q in q_heads]
    kept = sorted(set(reads))
    even = len(q_heads) % len(kept) == 0 and reads == [kept[j // (len(q_heads) // len(kept))]
                                                       for j in range(len(q_heads))]
    return q_heads, kept if even else reads


def rank_kv_heads(num_heads: int, num_kv_heads: int, world: int) -> int:
    """The most KV heads any rank keeps (`_kv_heads`): Nkv / world when that splits evenly, more when replicated."""
    return max(len(_kv_heads(num_heads, num_kv_heads, r, world)[1]) for r in range(world))


def _shard_gqa(op: GQAAttention, rank: int, world: int, group: dist.ProcessGroup | None) -> None:
    """In place: this rank's query heads and the KV heads they read (q/k/v column-parallel), o_proj
    row-parallel over those heads; the op stays a GQAAttention, so its forward and the runtime run it."""
    d = op.head_dim
    q_heads, kv_heads = _kv_heads(op.num_heads, op.num_kv_heads, rank, world)
    dev = op.q_proj.weight.device
    q_rows, kv_rows = _head_rows(q_heads, d, dev), _head_rows(kv_heads, d, dev)
    o_proj = _linear(op.o_proj.weight[:, q_rows], None, AllReduceLinear, group=group)
    op.q_proj = _rows(op.q_proj, q_rows)
    op.k_proj, op.v_proj = _rows(op.k_proj, kv_rows), _rows(op.v_proj, kv_rows)
    op.o_proj = o_proj
    op.num_heads, op.num_kv_heads = len(q_heads), len(kv_heads)
    drop_fused(op)  # fused views of the unsharded weights


def _shard_swiglu(op: SwiGLU, rank: int, world: int, group: dist.ProcessGroup | None) -> None:
    """In place: gate/up column-parallel, down row-parallel over this rank's intermediate features."""
    cols = _split(op.gate_proj.out_features, rank, world)
    op.gate_proj, op.up_proj = _rows(op.gate_proj, cols), _rows(op.up_proj, cols)
    op.down_proj = _linear(op.down_proj.weight[:, cols], None, AllReduceLinear, group=group)
    drop_fused(op)  # fused views of the unsharded weights


def _shard_input(layer: nn.Linear, rank: int, world: int, group: dist.ProcessGroup | None) -> AllReduceLinear:
    """A linear sub-block's H x H matrix, row-parallel over its input features."""
    cols = _split(layer.in_features, rank, world)
    shard = _linear(layer.weight[:, cols], None, AllReduceLinear, group=group, x_slice=cols)
    return shard  # type: ignore[return-value]


def check_tensor_parallel(config: ModelConfig, world: int, blocks: Sequence[BlockConfig] | None = None,
                          where: str | None = None, knob: str = "world size") -> None:
    """Raise a one-line PuzzleError when `world` ranks cannot split the query heads or a block evenly.

    blocks: what is split (default: the model's layers, named "layer i"; given: variants, named by their FFN).
    where / knob: how the message names the split and the setting to change (default: "tensor parallelism
    over n ranks" / "world size"; the costs stage names the workload and its tensor_parallel degree).
    """
    if world < 1:
        raise PuzzleError(f"tensor-parallel world size must be at least 1, got {world}")
    where = where or f"tensor parallelism over {world} ranks"
    fix = f"use a {knob} that divides it"
    if config.num_attention_heads % world:
        raise PuzzleError(f"{where} needs the query heads ({config.num_attention_heads}) divisible by {world}; {fix}")
    named = [(f"layer {i}", b) for i, b in enumerate(config.blocks)] if blocks is None else \
        [(f"variant {b.ffn.name}", b) for b in blocks]
    for name, b in named:
        if "linear" in (b.attention.kind, b.ffn.kind) and config.hidden_size % world:
            raise PuzzleError(f"{where} cannot split {name}: a linear sub-block needs hidden_size "
                              f"({config.hidden_size}) divisible by {world}; {fix}")
        if b.ffn.kind == "swiglu" and b.ffn.intermediate_size % world:
            raise PuzzleError(f"{where} cannot split {name}: SwiGLU intermediate size {b.ffn.intermediate_size} "
                              f"is not divisible by {world}; {fix}")


@torch.no_grad()
def shard_model(model: PuzzleModel, rank: int, world: int, group: dist.ProcessGroup | None = None,
                inplace: bool = False) -> PuzzleModel:
    """A copy of `model` holding rank `rank`'s tensor-parallel slice of every sub-block (rules: module doc).

    Every rank must call it with the same weights; the copy's `forward` all-reduces over `group` (default:
    the world group) and returns the full logits on every rank. `world == 1` returns an unsharded copy.
    inplace: shard `model` itself and return it: each split projection is replaced by its slice as it goes,
    so the rank never holds a second full copy (a 70B parent on 8 GPUs: one full model per rank at most).
    """
    check_tensor_parallel(model.config.with_blocks(model.block_configs), world)
    if not 0 <= rank < world:
        raise PuzzleError(f"tensor-parallel rank {rank} is outside 0..{world - 1}")
    sharded = model if inplace else copy.deepcopy(model)
    if world == 1:
        return sharded
    for layer in sharded.layers:
        for block in (layer.attention, layer.ffn):
            op = block.op if block is not None else None
            if isinstance(op, GQAAttention):
                _shard_gqa(op, rank, world, group)
                block.config = AttentionConfig.gqa(op.num_kv_heads)  # type: ignore[union-attr]
            elif isinstance(op, SwiGLU):
                _shard_swiglu(op, rank, world, group)
            elif isinstance(op, LinearAttention):
                op.linear_attn = _shard_input(op.linear_attn, rank, world, group)
            elif isinstance(op, LinearFFN):
                op.linear_mlp = _shard_input(op.linear_mlp, rank, world, group)
    # The copy's config holds this rank's KV heads per layer, so a runtime KV cache allocates only those.
    sharded.config = sharded.config.with_blocks(sharded.block_configs)
    return sharded


def tensor_parallel_engine(sharded: PuzzleModel, batch_size: int, max_seq_len: int,
                           graphs: GraphMode = "none", bucket: int = 256) -> Engine:
    """A runtime engine on a `shard_model` copy: prefill and KV-cached decode, all-reducing per sub-block.

    graphs: "none" (eager) or "manual" (CUDA-graph capture of the eager kernels; NCCL all-reduces can be
    captured). "fused"/"auto" are refused: the fused regions and batch-1 GEMVs read o_proj / down_proj
    weights directly and would skip the all-reduce. No q/k/v or gate/up fusion either (it would work, but
    is not tested sharded).
    """
    if graphs not in ("none", "manual"):
        raise PuzzleError(f"graph mode {graphs!r} is not supported with tensor parallelism; "
                          "use 'none' or 'manual'")
    return Engine(sharded, batch_size, max_seq_len, graphs=graphs, bucket=bucket, fuse=False)
