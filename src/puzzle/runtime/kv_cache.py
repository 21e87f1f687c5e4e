"""A static KV cache sized per layer: one K and one V [B, Nkv_i, S, D] for each GQA layer, none otherwise.

Shapes never change after allocation, so a decode step that writes into it can be captured in a CUDA graph:
new keys/values are written with `index_copy_` at slot indices held in a (static) tensor, and attention
reads the whole cache (or a fixed-length prefix of it) under a mask.
"""

from __future__ import annotations

import torch

from puzzle.core.errors import PuzzleError
from puzzle.model.blocks import ModelConfig


class LayerCache:
    """K/V storage of one attention layer.

    The owner's `slots` (shared by every layer of a `StaticKVCache`) are the cache indices [T] that the next
    `write` fills; attention reads the first `owner.attend_len` slots (`puzzle.runtime.attention`).
    """

    def __init__(self, owner: StaticKVCache, k: torch.Tensor, v: torch.Tensor) -> None:
        self.owner = owner
        self.k = k  # [B, Nkv, S, D]
        self.v = v

    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v [B, Nkv, T, D] -> slots owner.slots [T] along the sequence dim
        self.k.index_copy_(2, self.owner.slots, k)
        self.v.index_copy_(2, self.owner.slots, v)


class StaticKVCache:
    """Per-layer static K/V tensors; `layers[i]` is None for no-op and linear attention layers."""

    def __init__(self, config: ModelConfig, batch_size: int, max_seq_len: int,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if batch_size <= 0 or max_seq_len <= 0:
            raise PuzzleError(f"KV cache needs a positive batch and length, got {batch_size} x {max_seq_len}")
        self.config = config
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.device = torch.device(device)
        self.dtype = dtype
        self.slots = torch.zeros(1, dtype=torch.long, device=self.device)  # [T] write indices
        self.attend_len = max_seq_len
        self.layers: list[LayerCache | None] = []
        d = config.head_dim
        for block in config.blocks:
            if block.attention.kind != "gqa":
                self.layers.append(None)  # no keys, no values: nothing allocated
                continue
            shape = (batch_size, block.attention.num_kv_heads, max_seq_len, d)
            k = torch.zeros(shape, device=self.device, dtype=dtype)
            v = torch.zeros(shape, device=self.device, dtype=dtype)
            self.layers.append(LayerCache(self, k, v))

    def set_slots(self, slots: torch.Tensor, attend_len: int | None = None) -> None:
        """Where the next update writes ([T] long, on the cache's device) and how many slots it returns."""
        self.slots = slots
        self.attend_len = self.max_seq_len if attend_len is None else attend_len

    def tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.layers if layer is not None for t in (layer.k, layer.v)]

    def nbytes(self) -> int:
        """Bytes of every K and V tensor (what the memory model predicts)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def reset(self) -> None:
        for t in self.tensors():
            t.zero_()
