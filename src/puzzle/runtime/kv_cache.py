"""A static KV cache sized per layer: one K and one V [B, Nkv_i, S, D] for each GQA layer, none otherwise.

Shapes never change after allocation, so a decode step that writes into it can be captured in a CUDA graph:
new keys/values are written with `index_copy_` at slot indices held in a (static) tensor, and attention
reads the whole cache (or a fixed-length prefix of it) under a mask, or, in a decode step with the Triton
kernel (`puzzle.runtime.decode_attention`), each row's slots [start, last written slot] only.

FP8 cache (kv_dtype=torch.float8_e4m3fn): K and V are stored as e4m3 with one fp32 scale each per layer (1 byte
per element, as an FP8 serving engine keeps them) and dequantized to the compute dtype where attention reads
them. A fresh write (a prefill from slot 0) sets each layer's scales from its own keys' and values' amax with
KV_HEADROOM to spare, so later tokens rarely saturate (vLLM's `calculate_kv_scales` does the same); the scales
live in static tensors, so the step stays capturable.
"""

from __future__ import annotations

import torch

from puzzle.core.errors import PuzzleError
from puzzle.model.blocks import ModelConfig
from puzzle.runtime.fp8 import E4M3, E4M3_MAX, quantize_tensor

KV_HEADROOM = 4.0  # a fresh write maps amax to 448 / 4: 4x room for decode tokens; costs only subnormal range
KV_DTYPES = (None, E4M3)  # None: the compute dtype


def store(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
          k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None, fresh: bool = False) -> None:
    """k, v [B, Nkv, T, D] -> the cache [B, Nkv, S, D] at slots [T]; quantized when the scales ([1] fp32) are
    given, after a fresh write has set them from this k and v."""
    if k_scale is None or v_scale is None:
        k_cache.index_copy_(2, slots, k)
        v_cache.index_copy_(2, slots, v)
        return
    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        if fresh:
            scale.copy_(x.abs().amax().float().clamp(min=1e-12).reshape(1) * (KV_HEADROOM / E4M3_MAX))
        cache.index_copy_(2, slots, quantize_tensor(x, scale).view(torch.uint8))  # e4m3 bits: see LayerCache


class LayerCache:
    """K/V storage of one attention layer.

    The owner's `slots` (shared by every layer of a `StaticKVCache`) are the cache indices [T] that the next
    `write` fills; attention reads the first `owner.attend_len` slots (`puzzle.runtime.attention`).
    """

    def __init__(self, owner: StaticKVCache, k: torch.Tensor, v: torch.Tensor) -> None:
        self.owner = owner
        # [B, Nkv, S, D]; an FP8 cache holds the e4m3 bits in uint8 tensors: index_copy_ and fills have no
        # float8 kernels on CPU (nor on CUDA in some torch versions), and a compiled region then writes a plain
        # integer buffer instead of mutating an input through a dtype view
        self.k = k
        self.v = v
        quantized = k.dtype == torch.uint8
        # FP8 only: the per-layer fp32 scales [1] (stored value * scale = the real value)
        self.k_scale = torch.ones(1, device=k.device) if quantized else None
        self.v_scale = torch.ones(1, device=k.device) if quantized else None

    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v [B, Nkv, T, D] -> slots owner.slots [T] along the sequence dim
        store(self.k, self.v, self.owner.slots, k, v, self.k_scale, self.v_scale, self.owner.fresh)

    def read(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n slots of K and V [B, Nkv, n, D] in the compute dtype (dequantized in an FP8 cache)."""
        k, v = self.k[:, :, :n], self.v[:, :, :n]
        if self.k_scale is None or self.v_scale is None:
            return k, v
        dtype = self.owner.dtype
        return ((k.view(E4M3).float() * self.k_scale).to(dtype), (v.view(E4M3).float() * self.v_scale).to(dtype))


class StaticKVCache:
    """Per-layer static K/V tensors; `layers[i]` is None for no-op and linear attention layers."""

    def __init__(self, config: ModelConfig, batch_size: int, max_seq_len: int,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 kv_dtype: torch.dtype | None = None) -> None:
        """dtype: the compute dtype (what attention reads); kv_dtype: how K/V are stored (None: dtype, or
        torch.float8_e4m3fn)."""
        if batch_size <= 0 or max_seq_len <= 0:
            raise PuzzleError(f"KV cache needs a positive batch and length, got {batch_size} x {max_seq_len}")
        if kv_dtype not in KV_DTYPES and kv_dtype != dtype:
            raise PuzzleError(f"KV cache dtype {kv_dtype} is not supported; use None (the model's dtype) or "
                              "torch.float8_e4m3fn")
        self.config = config
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.device = torch.device(device)
        self.dtype = dtype
        self.kv_dtype = kv_dtype or dtype
        self.fresh = False  # the next write starts a sequence (FP8: sets the scales)
        self.slots = torch.zeros(1, dtype=torch.long, device=self.device)  # [T] write indices
        # [B] each row's first valid slot (its left padding; `Engine.pad` is this tensor): a decode kernel
        # reads slots [start, slots[-1]]
        self.start = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.attend_len = max_seq_len
        self.layers: list[LayerCache | None] = []
        d = config.head_dim
        for block in config.blocks:
            if block.attention.kind != "gqa":
                self.layers.append(None)  # no keys, no values: nothing allocated
                continue
            shape = (batch_size, block.attention.num_kv_heads, max_seq_len, d)
            storage = torch.uint8 if self.quantized else self.kv_dtype  # e4m3 bits (see LayerCache)
            k = torch.zeros(shape, device=self.device, dtype=storage)
            v = torch.zeros(shape, device=self.device, dtype=storage)
            self.layers.append(LayerCache(self, k, v))

    def set_slots(self, slots: torch.Tensor, attend_len: int | None = None, fresh: bool = False) -> None:
        """Where the next update writes ([T] long, on the cache's device) and how many slots it returns;
        fresh: it starts a new sequence (a prefill), which sets an FP8 cache's scales."""
        self.slots = slots
        self.attend_len = self.max_seq_len if attend_len is None else attend_len
        self.fresh = fresh

    def tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.layers if layer is not None for t in (layer.k, layer.v)]

    @property
    def quantized(self) -> bool:
        return self.kv_dtype == E4M3

    def nbytes(self) -> int:
        """Bytes of every K and V tensor (what the memory model predicts)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def reset(self) -> None:
        for t in self.tensors():
            t.zero_()
