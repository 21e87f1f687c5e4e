"""Batched prefill and decode of any Puzzle child on a static per-layer KV cache, with CUDA graphs.

The model (`puzzle.model.decoder.PuzzleModel`) owns the weights; the runtime owns the inference kernels.
One layer loop (`run_layers`) runs every forward pass; what it calls per sub-block is a
`puzzle.runtime.subblocks.FusedRegions`: eager kernels, or compiled regions and batch-1 GEMVs
(GQA attention itself: `puzzle.runtime.attention`).
- Prompts of different lengths are left-padded: every row writes cache slot t at step t, each row has its
  own positions (slot - pad) and a key mask that hides its pad slots, so a batched row equals the same
  prompt run alone.
- A decode step has static shapes (token ids, slot index and mask live in fixed tensors; attention reads a
  fixed-length prefix of the cache, rounded up to `bucket` slots), so it is captured once per prefix
  length in a `torch.cuda.CUDAGraph` (with the Triton decode kernel, `decode_attention="triton"`, which reads
  the length from the slot tensor: once for every length). Graph modes: "fused" (default on CUDA: each sub-block is one
  torch.compile region that fuses its small kernels, then manual capture), "manual" (eager kernels, manual
  capture), "none" (eager; always on CPU). See `resolve_graph_mode` for the measured numbers. A whole-step
  torch.compile ("reduce-overhead") lives with the benchmarks (benchmarks/_graph_modes.py).
- The prefill runs the plain kernels (prefill="eager", the default) or the same compiled regions as the "fused"
  decode step at its T tokens (prefill="compiled": the elementwise kernels between the GEMMs fuse).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from puzzle.core.errors import PuzzleError
from puzzle.model.decoder import PuzzleModel
from puzzle.runtime.decode_attention import DecodeAttention
from puzzle.runtime.decode_attention import resolve as resolve_decode_attention
from puzzle.runtime.fp8 import has_fp8
from puzzle.runtime.fusion import fuse_projections
from puzzle.runtime.gemv import available as gemv_available
from puzzle.runtime.kv_cache import StaticKVCache
from puzzle.runtime.subblocks import EAGER, FusedRegions

GraphMode = Literal["auto", "fused", "manual", "none"]
GRAPH_MODES: tuple[str, ...] = ("auto", "fused", "manual", "none")  # what configs and the CLI accept
# Prefills of at most this many tokens (batch x prompt) are captured in CUDA graphs: below it the eager
# prefill is bound by kernel launches; above it by the GPU, and a graph would only hold on to more memory.
PREFILL_GRAPH_TOKENS = 4096
PrefillMode = Literal["eager", "compiled"]
PREFILL_MODES: tuple[str, ...] = ("eager", "compiled")


def run_layers(model: PuzzleModel, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
               cache: StaticKVCache, regions: FusedRegions) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every layer of `model` on the embedding h [B, T, H], each sub-block run by `regions`.

    Returns (h, pending update): h + update is the last hidden state (`regions.head` adds it). mask: see
    `FusedRegions.gqa`.
    """
    h, update = regions.begin(h)
    for layer, layer_cache in zip(model.layers, cache.layers):
        if layer.attention is not None:
            if layer_cache is not None:
                h, update = regions.gqa(layer.attention, h, update, cos, sin, mask, layer_cache)
            else:
                h, update = regions.residual(layer.attention, h, update)  # linear attention: no keys, no cache
        if layer.ffn is not None:
            h, update = regions.ffn(layer.ffn, h, update)
    return h, update


def resolve_graph_mode(mode: str, device: torch.device) -> str:
    if mode not in GRAPH_MODES:
        moved = " (a whole-step torch.compile lives in benchmarks/_graph_modes.py)" if mode == "compile" else ""
        raise PuzzleError(f"unknown graph mode {mode!r}{moved}; use {', '.join(GRAPH_MODES)}")
    if device.type != "cuda":
        return "none"  # CUDA graphs exist only on CUDA; CPU runs eagerly
    # "fused" (per-sub-block compiled regions + manual capture) is the default: a whole-step compile measured
    # 5.44 ms/token for Llama-3.1-8B at batch 1 on the H200, against 7.29 for plain manual capture and 22.8
    # eager; the regions keep those fusions, compile once per sub-block variant, and keep per-block costs
    # additive (benchmarks/README.md has the current numbers).
    return "fused" if mode == "auto" else mode


class Engine:
    """Prefill + decode for one batch size and maximum sequence length (prompt + generated)."""

    def __init__(self, model: PuzzleModel, batch_size: int, max_seq_len: int, graphs: GraphMode = "auto",
                 bucket: int = 256, fuse: bool | None = None, kv_dtype: torch.dtype | None = None,
                 decode_attention: DecodeAttention = "auto", prefill: PrefillMode = "eager") -> None:
        """fuse: run q/k/v and gate/up as single GEMVs (`puzzle.runtime.fusion`); None = on CUDA only.
        kv_dtype: how the KV cache stores keys and values (None: the model's dtype; torch.float8_e4m3fn: FP8,
        `puzzle.runtime.kv_cache`). FP8 linears come with the model (`puzzle.runtime.fp8.quantize_fp8`).
        decode_attention: "triton" (the flash-decoding kernel, `puzzle.runtime.decode_attention`: reads only the
        filled slots; one CUDA graph for every step), "sdpa" (SDPA over the bucketed prefix under a mask) or
        "auto" (triton on CUDA for an FP8 cache or from batch 128 up, sdpa otherwise: `decode_attention.resolve`).
        Prefill attention: SDPA. prefill: "eager" (the plain kernels) or "compiled": every sub-block's region
        (pending residual add + norm + projection + RoPE + cache write; SwiGLU's silu(gate) * up; o_proj; the
        head) is one inductor-compiled graph, as in the "fused" decode step, so the elementwise kernels between
        the GEMMs fuse. The regions compile with dynamic=False: once per distinct (batch, prompt length) and
        sub-block variant, which suits serving one workload; every new prompt length compiles anew."""
        if prefill not in PREFILL_MODES:
            raise PuzzleError(f"unknown prefill mode {prefill!r}; use {', '.join(PREFILL_MODES)}")
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
        self.prefill_mode = prefill
        # the prefill's sub-blocks: GEMMs (no GEMVs), SDPA over the new keys or the masked prefix
        self._prefill_regions = FusedRegions() if prefill == "compiled" else EAGER
        fuse_projections(model, self.device.type == "cuda" if fuse is None else fuse)
        self.cache = StaticKVCache(config, batch_size, max_seq_len, self.device, self.dtype, kv_dtype)
        self.decode_kernel = resolve_decode_attention(decode_attention, self.device, self.cache.quantized,
                                                       batch_size)
        b, s, dev = batch_size, max_seq_len, self.device
        self.valid = torch.zeros(b, s, dtype=torch.bool, device=dev)  # [B, S] slots holding real tokens
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)  # [1] the slot this decode step writes
        self.ids = torch.zeros(b, 1, dtype=torch.long, device=dev)  # [B, 1] this step's input tokens
        self.logits = torch.zeros(b, config.vocab_size, dtype=torch.float32, device=dev)  # [B, V]
        self.length = 0  # slots filled so far (same for every row thanks to left-padding)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}  # decode step per attended prefix length
        # prefill per (prompt length, padded): the graph and its static input ids [B, P]
        self._prefill_graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self.captured = self.graph_mode in ("manual", "fused")  # decode steps (and small prefills) in CUDA graphs
        # The decode step's sub-blocks: "fused" = compiled regions (see FusedRegions), otherwise eager kernels.
        # Triton GEMVs (see FusedRegions) read bf16/fp32 weights only: an FP8 model runs its scaled GEMMs instead
        gemv = batch_size == 1 and gemv_available(self.device) and not has_fp8(model)
        if self.graph_mode == "fused":
            self._regions = FusedRegions(gemv=gemv, decode_kernel=self.decode_kernel)
        else:
            self._regions = FusedRegions(backend=None, decode_kernel=True) if self.decode_kernel else EAGER

    @property
    def pad(self) -> torch.Tensor:
        """[B] each row's left padding: the cache's `start` (its first valid slot, which the decode kernel
        reads from), one tensor for positions, masks and the kernel; the same object for the engine's life,
        as captured CUDA graphs need."""
        return self.cache.start

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
        if self.captured and b * p <= PREFILL_GRAPH_TOKENS:
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
        self.cache.set_slots(ar, attend_len=p, fresh=True)
        mask = None
        if padded:
            causal = torch.ones(p, p, dtype=torch.bool, device=dev).tril()
            mask = causal[None] & self.valid[:, None, :p]  # [B, P, P]
            # A pad query sees only itself, so its (ignored) state stays finite and cannot poison K/V.
            mask = (mask | torch.eye(p, dtype=torch.bool, device=dev)[None])[:, None]  # [B, 1, P, P]
        h = self.model.embed(input_ids)
        cos, sin = self.model.rope(positions, h.dtype)
        h, update = run_layers(self.model, h, cos, sin, mask, self.cache, self._prefill_regions)
        self._prefill_regions.head(self.model, h, update, self.logits)

    def _prefill_replay(self, input_ids: torch.Tensor, padded: bool) -> None:
        key = (input_ids.shape[1], padded)
        if key not in self._prefill_graphs:
            ids = torch.zeros_like(input_ids, device=self.device)  # the graph's static input [B, P]
            ids.copy_(input_ids)
            warmup = 2 if self._prefill_regions.compiled else 1  # as the decode step: compile, then one clean run
            self._prefill_graphs[key] = (self._capture(lambda: self._prefill_body(ids, padded), warmup), ids)
        graph, ids = self._prefill_graphs[key]
        ids.copy_(input_ids)
        graph.replay()

    # ---- decode ----------------------------------------------------------------------------------

    def attend_len(self, length: int) -> int:
        """Cache prefix a step at `length` filled slots reads: exact when eager, bucketed for graphs; the
        whole cache with the decode kernel (which stops at the last written slot): one graph for every step."""
        if self.graph_mode == "none":
            return length + 1
        if self.decode_kernel:
            return self.max_seq_len
        return min(self.max_seq_len, -(-(length + 1) // self.bucket) * self.bucket)

    def _step(self, attend_len: int) -> None:
        """One decode step on the static buffers (graph-capturable: no host sync, fixed shapes)."""
        self.valid.index_fill_(1, self.slot, True)
        positions = (self.slot - self.pad)[:, None]  # [B, 1]
        h = self.model.embed(self.ids)  # [B, 1, H]
        cos, sin = self.model.rope(positions, h.dtype)
        # Additive mask [B, 1, 1, L], built once per step rather than converted from bool in every layer's SDPA;
        # the decode kernel reads no mask (a bool view marks the step as a decode, not a fresh prefill)
        if self.decode_kernel:
            mask = self.valid[:, None, None, :attend_len]
        else:
            mask = (~self.valid[:, None, None, :attend_len]).to(h.dtype) * torch.finfo(h.dtype).min
        h, update = run_layers(self.model, h, cos, sin, mask, self.cache, self._regions)
        self._regions.head(self.model, h, update, self.logits)

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

    def _run_step(self, attend_len: int) -> None:
        """One decode step reading `attend_len` cache slots: replayed from its graph, or run eagerly."""
        if self.captured:
            self._replay(attend_len)
        else:
            self._step(attend_len)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ([B]); returns the next-token logits [B, V] (a buffer reused each step)."""
        if self.length >= self.max_seq_len:
            raise PuzzleError(f"the KV cache is full ({self.max_seq_len} tokens); build the engine longer")
        self.ids.copy_(tokens.view(self.batch_size, 1))
        self.slot.fill_(self.length)
        n = self.attend_len(self.length)
        self.cache.set_slots(self.slot, attend_len=n)
        self._run_step(n)
        self.length += 1
        return self.logits

    def decode_at(self, ctx: int, tokens: torch.Tensor) -> Callable[[], None]:
        """A repeatable decode step that reads `ctx` filled cache slots, as at a workload's mean context:
        each call rewrites slot ctx - 1 from `tokens` [B] and attends over slots [0, ctx) (every slot valid).
        For timing (`puzzle.costs`): the cache holds whatever the last prefill left, not a real context."""
        self.valid.fill_(True)
        self.pad.zero_()  # no padding: positions are the slots, the decode kernel reads from slot 0

        def step() -> None:
            self.length = ctx - 1
            self.decode(tokens)

        return step


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
