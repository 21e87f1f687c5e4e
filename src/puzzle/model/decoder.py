"""The heterogeneous decoder: any Puzzle child (per-layer GQA / linear / no-op attention and FFN).

Plain single-device PyTorch for training, scoring and evaluation: causal attention over the given tokens,
no KV cache (inference with a cache is `puzzle.runtime`). Parallelism (DDP, FSDP2, placement) is applied
from outside.

Shapes: B batch, T tokens, H hidden, Nq/Nkv heads, D head_dim.
State-dict keys: `embed_tokens.weight`, `layers.{i}.attention.norm.weight`, `layers.{i}.attention.op.q_proj.weight`,
`layers.{i}.ffn.op.down_proj.weight`, `norm.weight`, `lm_head.weight` (absent when tied). The HF adapter in
`puzzle.formats.hf` maps them to HF / Nemotron-NAS names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from puzzle.model.blocks import AttentionConfig, BlockConfig, FFNConfig, ModelConfig
from puzzle.model.kinds import ffn_kind


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, as Llama does, then cast back before the (possibly bf16) scale.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """inv_freq [D/2], with Llama-3 frequency scaling when `rope_scaling.rope_type == 'llama3'`."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") != "llama3":
        return inv_freq
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotate-half RoPE (the HF layout).

    inv_freq is a plain fp32 tensor, not a buffer, so that `model.to(bf16)` cannot degrade it; one copy is
    kept per device so that CUDA-graph capture never sees a host-to-device copy.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.inv_freq = rope_inverse_frequencies(config)  # [D/2] fp32 on CPU
        self._per_device: dict[torch.device, torch.Tensor] = {}

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids [B, T] -> cos, sin [B, T, D]
        device = position_ids.device
        if device not in self._per_device:
            self._per_device[device] = self.inv_freq.to(device)
        freqs = position_ids[..., None].float() * self._per_device[device]  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, N, T, D]; cos, sin [B, T, D]
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class GQAAttention(nn.Module):
    """Grouped-query attention: Nq query heads share Nkv key/value heads."""

    def __init__(self, config: ModelConfig, num_kv_heads: int) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, num_kv_heads, d
        bias = config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(h, num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Causal attention over the T tokens of x [B, T, H] (already normalised) -> [B, T, H]."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # [B, Nq, T, D]
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Nkv, T, D]
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.num_kv_heads != self.num_heads:
            # Expanding is as fast as SDPA's enable_gqa on every backend and works on all torch versions.
            group = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class LinearAttention(nn.Module):
    """Attention replaced by one hidden x hidden matrix (Nemotron-NAS `replace_with_linear`)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.linear_attn = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, *_: object, **__: object) -> torch.Tensor:
        return self.linear_attn(x)


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LinearFFN(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear_mlp = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_mlp(x)


class AttentionBlock(nn.Module):
    """norm -> attention (GQA or linear); returns the residual update, not the new hidden state."""

    def __init__(self, config: ModelConfig, attention: AttentionConfig) -> None:
        super().__init__()
        assert attention.kind != "no_op", "no-op attention owns no module"
        self.config = attention
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.op = GQAAttention(config, attention.num_kv_heads) if attention.kind == "gqa" else LinearAttention(config)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self.op(self.norm(h), cos, sin)


class FFNBlock(nn.Module):
    """norm -> FFN (the module of its kind, `puzzle.model.kinds`); returns the residual update."""

    def __init__(self, config: ModelConfig, ffn: FFNConfig) -> None:
        super().__init__()
        assert ffn.kind != "no_op", "no-op FFN owns no module"
        self.config = ffn
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.op = ffn_kind(ffn.kind).build(config.hidden_size, ffn.intermediate_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.op(self.norm(h))


def build_attention_block(config: ModelConfig, attention: AttentionConfig) -> AttentionBlock | None:
    return None if attention.kind == "no_op" else AttentionBlock(config, attention)


def build_ffn_block(config: ModelConfig, ffn: FFNConfig) -> FFNBlock | None:
    return FFNBlock(config, ffn) if ffn_kind(ffn.kind).has_module else None


class DecoderLayer(nn.Module):
    """h + attention(h), then + ffn(.). A no-op sub-block is `None`: it adds nothing and owns nothing."""

    def __init__(self, attention: AttentionBlock | None, ffn: FFNBlock | None) -> None:
        super().__init__()
        self.attention = attention
        self.ffn = ffn

    @property
    def block_config(self) -> BlockConfig:
        return BlockConfig(
            self.attention.config if self.attention is not None else AttentionConfig.no_op(),
            self.ffn.config if self.ffn is not None else FFNConfig.no_op(),
        )

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.attention is not None:
            h = h + self.attention(h, cos, sin)
        if self.ffn is not None:
            h = h + self.ffn(h)
        return h


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, T, V]
    hidden_states: list[torch.Tensor] | None = None  # one [B, T, H] per layer output (before the final norm)


class PuzzleModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(build_attention_block(config, b.attention), build_ffn_block(config, b.ffn))
            for b in config.blocks
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config)

    # ---- pieces, so that scoring, BLD and the runtime can run part of the model --------------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)  # [B, T] -> [B, T, H]

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary(position_ids, dtype)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: [B, T, H] -> logits [B, T, V]."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(self.norm(h), weight)

    def run_layers(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        start: int = 0,
        end: int | None = None,
        hidden_states: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Layers [start, end); appends each layer's output to `hidden_states` when given."""
        end = len(self.layers) if end is None else end
        for i in range(start, end):
            h = self.layers[i](h, cos, sin)
            if hidden_states is not None:
                hidden_states.append(h)
        return h

    def default_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        b, t = input_ids.shape
        return torch.arange(t, device=input_ids.device).expand(b, t)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        position_ids: torch.Tensor | None = None,  # [B, T]; default 0..T-1
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        if position_ids is None:
            position_ids = self.default_positions(input_ids)
        h = self.embed(input_ids)
        cos, sin = self.rope(position_ids, h.dtype)
        hidden: list[torch.Tensor] | None = [] if output_hidden_states else None
        h = self.run_layers(h, cos, sin, hidden_states=hidden)
        return ModelOutput(self.head(h), hidden)

    # ---- architecture ----------------------------------------------------------------------------

    @property
    def block_configs(self) -> list[BlockConfig]:
        return [layer.block_config for layer in self.layers]

    def set_layer(self, index: int, attention: AttentionBlock | None, ffn: FFNBlock | None) -> None:
        """Swap layer `index`'s sub-blocks and keep `config.blocks` in step."""
        self.layers[index] = DecoderLayer(attention, ffn)
        blocks = list(self.config.blocks)
        blocks[index] = self.layers[index].block_config
        self.config = self.config.with_blocks(blocks)

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> PuzzleModel:
        """Random init as Llama does (normal(0, std) matrices, unit norms, zero biases)."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, std, generator=generator)
        return self


def build_model(config: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                seed: int | None = None) -> PuzzleModel:
    """A model with random weights, or on the meta device with no storage at all."""
    with torch.device(device):
        model = PuzzleModel(config)
    if torch.device(device).type != "meta":
        gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        model.init_weights(generator=gen)
    return model.to(dtype)
