"""Nemotron-NAS (DeciLM) heterogeneous decoder, written by the `puzzle` package; needs only torch + transformers.

Every layer has its own attention (GQA with any KV-head count, one linear matrix, or nothing) and FFN (SwiGLU
of any width, one linear matrix, or nothing). Weight names follow Nemotron-NAS:
    model.layers.{i}.input_layernorm / self_attn.{q,k,v,o}_proj / self_attn.linear_attn
    model.layers.{i}.post_attention_layernorm / mlp.{gate,up,down}_proj / mlp.linear_mlp
KV cache: only GQA layers store keys and values, under consecutive cache indices (the first GQA layer is
cache layer 0), so that `Cache.get_seq_length()` reports the real length even when layer 0 has no attention.
Works with every transformers 5.x: 5.24 renamed the cache argument and output field `past_key_values` -> `cache`
(both names are accepted here); 5.0's static cache writes where `cache_position` says (it is passed to every
update); a static cache returns all its slots, so masks are built for the key length the cache returns.
Shapes: B batch, T new tokens, S attended tokens, H hidden, N heads, D head_dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
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


# The output field that holds the cache in this transformers version ("cache" from 5.24, "past_key_values" before).
_CACHE_FIELD = "cache" if "cache" in getattr(BaseModelOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


def _one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The KV cache, under whichever name the caller used (`generate` of 5.24+ says `cache`, older `past_key_values`)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


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


@dataclass
class _Step:
    """What every layer of one forward pass shares."""

    cos: torch.Tensor  # [B, T, D]
    sin: torch.Tensor  # [B, T, D]
    cache: Cache | None
    cache_position: torch.Tensor  # [T] cache slots of the new tokens
    mask_for: Callable[[int], torch.Tensor | None]  # key length S -> bool [B, 1, T, S] or None (plain causal)


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

    def forward(self, x: torch.Tensor, step: _Step) -> torch.Tensor:
        b, t, _ = x.shape
        cos, sin = step.cos[:, None], step.sin[:, None]  # [B, 1, T, D]
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # [B, N, T, D]
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if step.cache is not None:
            # [B, Nkv, S, D]; the dict is 5.0's cache_kwargs (its static cache writes at cache_position)
            k, v = step.cache.update(k, v, self.cache_index, {"cache_position": step.cache_position})
        mask = step.mask_for(k.shape[-2])
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

    def forward(self, x: torch.Tensor, _step: _Step) -> torch.Tensor:
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

    def forward(self, h: torch.Tensor, step: _Step) -> torch.Tensor:
        if self.has_attention:
            h = h + self.self_attn(self.input_layernorm(h), step)
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
        # transformers 5.0 calls this for every module after loading, 5.24 only for modules with missing weights;
        # a tensor marked `_is_hf_initialized` was loaded from the checkpoint (or is tied to one) and is kept.
        def fresh(p: torch.Tensor | None) -> bool:
            return p is not None and not getattr(p, "_is_hf_initialized", False)

        std = getattr(self.config, "initializer_range", 0.02)
        with torch.no_grad():
            if isinstance(module, (nn.Linear, nn.Embedding)) and fresh(module.weight):
                module.weight.normal_(0.0, std)
            if isinstance(module, nn.Linear) and fresh(module.bias):
                module.bias.zero_()
            elif isinstance(module, DeciLMRMSNorm) and fresh(module.weight):
                module.weight.fill_(1.0)


def _build_mask(attention_mask: torch.Tensor | None, batch: int, cache_position: torch.Tensor,
                s: int) -> torch.Tensor | None:
    """bool [B, 1, T, S] (True = attend) for T queries in cache slots `cache_position` [T] over S key slots, or
    None for plain causal attention (no padding, no cache). A static cache returns all its slots: the unwritten
    ones lie in the queries' future and stay masked. A 4D mask is used as given: bool or 0/1 = attend, float =
    additive. No host sync: torch.compile (which generate applies with a static cache on GPU) keeps one graph."""
    t = cache_position.shape[0]
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.shape[-1] != s:
            raise ValueError(f"4D attention_mask covers {attention_mask.shape[-1]} keys, the cache holds {s}")
        floating = attention_mask.is_floating_point()
        mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2 if floating else attention_mask.bool()
    else:
        if attention_mask is None and s == t:  # the keys are the queries' own tokens
            return None
        k_pos = torch.arange(s, device=cache_position.device)[None, :]
        mask = (k_pos <= cache_position[:, None])[None, None].expand(batch, 1, t, s)  # [B, 1, T, S]
        if attention_mask is not None:
            # [B, L] over the tokens so far (L = past + T); slot j holds token j, slots >= L are unwritten
            real = attention_mask[:, -s:].bool()
            real = F.pad(real, (0, s - real.shape[-1]), value=False)  # [B, S]
            mask = mask & real[:, None, None, :]
    # A row with nothing to attend to (a left-pad query) would give NaN; let it see everything instead.
    empty = ~mask.any(dim=-1, keepdim=True)
    return mask | empty


def _touch_spare_layers(cache: Cache, used: int, h: torch.Tensor, head_dim: int) -> None:
    """Give the cache layers past the GQA ones an empty update. A cache sized from the config has one layer per
    model layer; one never updated stays uninitialized, and transformers 5.0-5.10 then fail to reuse a static
    cache (they read `max_batch_size` of every layer)."""
    layers = getattr(cache, "layers", [])
    spare = [i for i in range(used, len(layers)) if not getattr(layers[i], "is_initialized", True)]
    if spare:
        empty = h.new_zeros(h.shape[0], 1, 0, head_dim)  # [B, 1, 0, D]
        for i in spare:
            cache.update(empty, empty, i, {"cache_position": torch.arange(0, device=h.device)})


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
        self.num_cache_layers = cache_index
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
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, H]
        b, t = h.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = _one_cache(cache, past_key_values) if use_cache else None
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        # [T] slots of the new tokens: early 5.x `generate` passes them; later ones leave the count to the cache
        cache_position = kwargs.get("cache_position")
        if cache_position is None:
            past = cache.get_seq_length() if cache is not None else 0  # an int, or a 0-dim tensor (static caches)
            cache_position = torch.arange(t, device=h.device) + past
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
            else:
                position_ids = cache_position[None].expand(b, t)
        freqs = position_ids[..., None].float() * _inverse_frequencies(self.config, h.device)  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        masks: dict[int, torch.Tensor | None] = {}  # one per key length; every GQA layer sees the same

        def mask_for(s: int) -> torch.Tensor | None:
            if s not in masks:
                masks[s] = _build_mask(attention_mask, b, cache_position, s)
            return masks[s]

        step = _Step(emb.cos().to(h.dtype), emb.sin().to(h.dtype), cache, cache_position, mask_for)
        if cache is not None:
            _touch_spare_layers(cache, self.num_cache_layers, h, self.config.head_dim)
        hidden_states = [h] if output_hidden_states else None
        for layer in self.layers:
            h = layer(h, step)
            if hidden_states is not None:
                hidden_states.append(h)
        h = self.norm(h)
        if hidden_states is not None:
            hidden_states[-1] = h
        return BaseModelOutputWithPast(last_hidden_state=h, **{_CACHE_FIELD: cache},
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
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=_one_cache(cache, past_key_values), inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_hidden_states=output_hidden_states, cache_position=kwargs.get("cache_position"))
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
        result = CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)},
                                        hidden_states=out.hidden_states)
        return result.to_tuple() if return_dict is False else result
