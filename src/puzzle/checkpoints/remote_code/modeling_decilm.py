"""Nemotron-NAS (DeciLM) heterogeneous decoder, written by the `puzzle` package; needs only torch + transformers.

Every layer has its own attention (GQA with any KV-head count, one linear matrix, or nothing) and FFN (SwiGLU
of any width, one linear matrix, or nothing). Weight names follow Nemotron-NAS:
    model.layers.{i}.input_layernorm / self_attn.{q,k,v,o}_proj / self_attn.linear_attn
    model.layers.{i}.post_attention_layernorm / mlp.{gate,up,down}_proj / mlp.linear_mlp
KV cache: only GQA layers store keys and values, under consecutive cache indices (the first GQA layer is
cache layer 0), so that `Cache.get_seq_length()` reports the real length even when layer 0 has no attention.
Shapes: B batch, T new tokens, S attended tokens, H hidden, N heads, D head_dim.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

try:
    from .configuration_decilm import DeciLMConfig
except ImportError:  # loaded as a top-level module
    from configuration_decilm import DeciLMConfig


def _find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


def _ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    return _find_multiple(int(2 * ffn_mult * hidden_size / 3), 256)


def _layer_kinds(config: DeciLMConfig, index: int) -> tuple[str, int | None, str, int | None]:
    """(attention kind, kv heads, ffn kind, intermediate size) of layer `index`."""
    block = config.block_configs[index]
    att, ffn = block.get("attention", {}), block.get("ffn", {})
    if att.get("no_op"):
        att_kind, kv = "no_op", None
    elif att.get("replace_with_linear"):
        att_kind, kv = "linear", None
    else:
        att_kind, kv = "gqa", config.num_attention_heads // int(att["n_heads_in_group"])
    if ffn.get("no_op"):
        ffn_kind, size = "no_op", None
    elif ffn.get("replace_with_linear"):
        ffn_kind, size = "linear", None
    elif ffn.get("intermediate_size") is not None:
        ffn_kind, size = "swiglu", int(ffn["intermediate_size"])
    else:
        ffn_kind, size = "swiglu", _ffn_mult_to_intermediate_size(float(ffn["ffn_mult"]), config.hidden_size)
    return att_kind, kv, ffn_kind, size


def _inverse_frequencies(config: DeciLMConfig, device: torch.device) -> torch.Tensor:
    """inv_freq [D/2] in fp32, with Llama-3 scaling when rope_type == 'llama3'."""
    rope = config.rope_parameters
    dim = config.head_dim
    inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope.get("rope_type", "default") == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_context = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq.to(device)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DeciLMRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x32.to(x.dtype)


class DeciLMAttention(nn.Module):
    def __init__(self, config: DeciLMConfig, num_kv_heads: int, cache_index: int) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, num_kv_heads, d
        self.cache_index = cache_index
        bias = config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(h, num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: Cache | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # [B, N, T, D]
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
        if cache is not None:
            k, v = cache.update(k, v, self.cache_index)  # [B, Nkv, S, D]
        group = self.num_heads // self.num_kv_heads
        if group > 1:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class DeciLMLinearAttention(nn.Module):
    def __init__(self, config: DeciLMConfig) -> None:
        super().__init__()
        self.linear_attn = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, *_: Any) -> torch.Tensor:
        return self.linear_attn(x)


class DeciLMMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DeciLMLinearMLP(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear_mlp = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_mlp(x)


class DeciLMDecoderLayer(nn.Module):
    """No-op sub-blocks own no module and no norm; they add nothing to the residual stream."""

    def __init__(self, config: DeciLMConfig, layer_idx: int, cache_index: int | None) -> None:
        super().__init__()
        att_kind, kv, ffn_kind, size = _layer_kinds(config, layer_idx)
        self.has_attention = att_kind != "no_op"
        self.has_ffn = ffn_kind != "no_op"
        if self.has_attention:
            self.input_layernorm = DeciLMRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.self_attn = (DeciLMAttention(config, kv, cache_index) if att_kind == "gqa"
                              else DeciLMLinearAttention(config))
        if self.has_ffn:
            self.post_attention_layernorm = DeciLMRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.mlp = DeciLMMLP(config.hidden_size, size) if ffn_kind == "swiglu" else DeciLMLinearMLP(config.hidden_size)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: Cache | None) -> torch.Tensor:
        if self.has_attention:
            h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache)
        if self.has_ffn:
            h = h + self.mlp(self.post_attention_layernorm(h))
        return h


class DeciLMPreTrainedModel(PreTrainedModel):
    config_class = DeciLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules: ClassVar[list[str]] = ["DeciLMDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        # Only reached for weights missing from a checkpoint; in-place so that loaded tensors are kept elsewhere.
        std = getattr(self.config, "initializer_range", 0.02)
        with torch.no_grad():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std)
            elif isinstance(module, DeciLMRMSNorm):
                module.weight.fill_(1.0)


def _build_mask(attention_mask: torch.Tensor | None, batch: int, t: int, past: int,
                device: torch.device) -> torch.Tensor | None:
    """bool [B, 1, T, S] (True = attend), or None for plain causal attention without padding or cache."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.bool() if attention_mask.dtype != torch.bool else attention_mask
    if attention_mask is None and past == 0:
        return None
    s = past + t
    q_pos = torch.arange(past, s, device=device)[:, None]
    k_pos = torch.arange(s, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None].expand(batch, 1, t, s)  # [B, 1, T, S]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, -s:].bool()
    # A row with nothing to attend to (a left-pad query) would give NaN; let it see everything instead.
    empty = ~mask.any(dim=-1, keepdim=True)
    return mask | empty


class DeciLMModel(DeciLMPreTrainedModel):
    def __init__(self, config: DeciLMConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        layers, cache_index = [], 0
        for i in range(config.num_hidden_layers):
            is_gqa = _layer_kinds(config, i)[0] == "gqa"
            layers.append(DeciLMDecoderLayer(config, i, cache_index if is_gqa else None))
            cache_index += int(is_gqa)
        self.layers = nn.ModuleList(layers)
        self.norm = DeciLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, H]
        b, t = h.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            try:
                past_key_values = DynamicCache(config=self.config)
            except TypeError:  # older signature without config
                past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
            else:
                position_ids = torch.arange(past, past + t, device=h.device).expand(b, t)
        freqs = position_ids[..., None].float() * _inverse_frequencies(self.config, h.device)  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)
        mask = _build_mask(attention_mask, b, t, past, h.device)
        hidden_states = [h] if output_hidden_states else None
        for layer in self.layers:
            h = layer(h, cos, sin, mask, past_key_values if use_cache else None)
            if hidden_states is not None:
                hidden_states.append(h)
        h = self.norm(h)
        if hidden_states is not None:
            hidden_states[-1] = h
        return BaseModelOutputWithPast(last_hidden_state=h, past_key_values=past_key_values if use_cache else None,
                                       hidden_states=tuple(hidden_states) if hidden_states is not None else None)


class DeciLMForCausalLM(DeciLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeciLMConfig) -> None:
        super().__init__(config)
        self.model = DeciLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_hidden_states=output_hidden_states)
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep > 0 else h
        else:
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)  # [B, T, V]
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1), ignore_index=-100)
        result = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                        hidden_states=out.hidden_states)
        return result.to_tuple() if return_dict is False else result
