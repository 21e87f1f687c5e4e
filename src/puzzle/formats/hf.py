"""THE Hugging Face adapter: explicit key maps and config translation, both ways.

Supported in: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, DeciLMForCausalLM (Nemotron-NAS).
Supported out: DeciLMForCausalLM (any child) and LlamaForCausalLM (homogeneous models).

Key map (ours <-> HF / Nemotron-NAS; `{i}` is the layer index):
    embed_tokens.weight                       <-> model.embed_tokens.weight
    norm.weight                               <-> model.norm.weight
    lm_head.weight                            <-> lm_head.weight
    layers.{i}.attention.norm.weight          <-> model.layers.{i}.input_layernorm.weight
    layers.{i}.attention.op.{q,k,v,o}_proj.*  <-> model.layers.{i}.self_attn.{q,k,v,o}_proj.*
    layers.{i}.attention.op.linear_attn.weight<-> model.layers.{i}.self_attn.linear_attn.weight
    layers.{i}.ffn.norm.weight                <-> model.layers.{i}.post_attention_layernorm.weight
    layers.{i}.ffn.op.{gate,up,down}_proj.*   <-> model.layers.{i}.mlp.{gate,up,down}_proj.*
    layers.{i}.ffn.op.linear_mlp.weight       <-> model.layers.{i}.mlp.linear_mlp.weight
"""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from puzzle.core.errors import PuzzleError
from puzzle.formats.nemotron_nas import block_from_nemotron, block_to_nemotron, json_value
from puzzle.model.blocks import BlockConfig, ModelConfig, uniform_blocks

NEMOTRON_FFN_MULT = "nemotron_ffn_mult"  # ModelConfig.extra key: an imported Nemotron-NAS config's ffn_mult per layer
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "DeciLMForCausalLM")

# Whole-model keys, and per-layer sub-key prefixes (ours -> HF). Everything else under a prefix is kept.
_GLOBAL_TO_HF = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_LAYER_TO_HF = {
    "attention.norm.": "input_layernorm.",
    "attention.op.": "self_attn.",
    "ffn.norm.": "post_attention_layernorm.",
    "ffn.op.": "mlp.",
}
_GLOBAL_FROM_HF = {v: k for k, v in _GLOBAL_TO_HF.items()}
_LAYER_FROM_HF = {v: k for k, v in _LAYER_TO_HF.items()}
_OUR_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Buffers some checkpoints carry that hold no learned state.
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq", "self_attn.rotary_emb.inv_freq", "masked_bias", ".attn.bias")


def key_to_hf(key: str) -> str:
    """Our state-dict key -> the HF / Nemotron-NAS key."""
    if key in _GLOBAL_TO_HF:
        return _GLOBAL_TO_HF[key]
    m = _OUR_LAYER.match(key)
    if m:
        rest = m.group(2)
        for ours, theirs in _LAYER_TO_HF.items():
            if rest.startswith(ours):
                return f"model.layers.{m.group(1)}.{theirs}{rest[len(ours):]}"
    raise PuzzleError(f"no HF name for weight {key!r}; the model has a module the HF adapter does not know")


def key_from_hf(key: str) -> str | None:
    """HF key -> our key; None for buffers that carry no weights (e.g. rotary inv_freq)."""
    if key.endswith(_IGNORED_HF_SUFFIXES):
        return None
    if key in _GLOBAL_FROM_HF:
        return _GLOBAL_FROM_HF[key]
    m = _HF_LAYER.match(key)
    if m:
        rest = m.group(2)
        for theirs, ours in _LAYER_FROM_HF.items():
            if rest.startswith(theirs):
                return f"layers.{m.group(1)}.{ours}{rest[len(theirs):]}"
    raise PuzzleError(
        f"unexpected weight {key!r} in the checkpoint; it is not a Llama/Mistral/Qwen2/Nemotron-NAS weight"
    )


def state_dict_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key_to_hf(k): v for k, v in state.items()}


def state_dict_from_hf(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        ours = key_from_hf(k)
        if ours is not None:
            out[ours] = v
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)  # tied: some exporters still write it
    return out


# ---- config translation: HF -> ModelConfig ------------------------------------------------------------


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from transformers-5 `rope_parameters` or legacy `rope_theta`+`rope_scaling`."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]  # per-layer-type form
    if isinstance(params, dict):
        theta = _number(params, "rope_theta", hf.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = _number(hf, "rope_theta", 10000.0)
        scaling = dict(hf.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("type", None)
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise PuzzleError(f"rope type {rope_type!r} is not supported; supported: default, llama3")
    keep = ("rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keep if k not in scaling]
    if missing:
        raise PuzzleError(f"llama3 rope scaling is missing {missing}; add them to config.json")
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        _number(scaling, key)
    _int(scaling, "original_max_position_embeddings")
    return theta, {k: scaling[k] for k in keep}


# Typed reads of config.json fields: a string where a number belongs, 1 for true, or a size <= 0 is an error
# naming the field, never a silent conversion (bool("false") is True).


def _int(hf: dict[str, Any], key: str, default: Any = None) -> int:
    """A positive integer (every integer field read here is a size or a count)."""
    value = hf.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise PuzzleError(f"config.json: {key!r} must be a positive integer, got {json_value(value)}; fix config.json")
    return value


def _number(hf: dict[str, Any], key: str, default: Any = None) -> float:
    value = hf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise PuzzleError(f"config.json: {key!r} must be a positive number, got {json_value(value)}; fix config.json")
    return float(value)


def _flag(hf: dict[str, Any], key: str) -> bool:
    """true / false; absent or null is false."""
    value = hf.get(key)
    if value is not None and not isinstance(value, bool):
        raise PuzzleError(f"config.json: {key!r} must be true or false, got {json_value(value)}; fix config.json")
    return bool(value)


def _token_ids(hf: dict[str, Any], key: str) -> Any:
    """null, a token id, or (eos) a list of token ids."""
    value = hf.get(key)
    ids = value if isinstance(value, list) and key == "eos_token_id" else [value]
    if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise PuzzleError(f"config.json: {key!r} must be a token id (an integer >= 0) or null, got "
                          f"{json_value(value)}; fix config.json")
    return value


def _nemotron_blocks(raw: list[Any], n_heads: int, hidden: int) -> tuple[BlockConfig, ...]:
    blocks = []
    for i, entry in enumerate(raw):
        try:
            blocks.append(block_from_nemotron(entry, n_heads, hidden))
        except PuzzleError as e:
            raise PuzzleError(f"config.json: layer {i} (block_configs[{i}]): {e}; fix config.json") from None
    return tuple(blocks)


def architecture_of(hf: dict[str, Any]) -> str:
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    if arch is None:  # fall back on model_type
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "nemotron-nas": "DeciLMForCausalLM", "deci": "DeciLMForCausalLM"}.get(hf.get("model_type", ""))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise PuzzleError(
            f"unsupported architecture {arch or hf.get('model_type')!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from an HF config.json dict (Llama, Mistral, Qwen2 or Nemotron-NAS)."""
    arch = architecture_of(hf)
    if hf.get("hidden_act", "silu") != "silu":
        raise PuzzleError(f"hidden_act {hf.get('hidden_act')!r} is not supported; only silu (SwiGLU) is")
    if _flag(hf, "mlp_bias"):
        raise PuzzleError("mlp_bias=true is not supported; only bias-free MLPs are")
    hidden = _int(hf, "hidden_size")
    n_heads = _int(hf, "num_attention_heads")
    n_layers = _int(hf, "num_hidden_layers")
    max_pos = _int(hf, "max_position_embeddings", 2048)
    head_dim = _int(hf, "head_dim") if hf.get("head_dim") is not None else None
    if head_dim is None and n_heads > 0 and hidden % n_heads:
        raise PuzzleError(
            f"num_attention_heads={n_heads} does not divide hidden_size={hidden}; fix config.json"
        )
    attention_bias = _flag(hf, "attention_bias")
    if arch == "Qwen2ForCausalLM":
        attention_bias = True  # Qwen2 always has q/k/v bias (and none on o_proj)
        window = _int(hf, "sliding_window") if hf.get("sliding_window") is not None else max_pos
        if _flag(hf, "use_sliding_window") and window < max_pos:
            raise PuzzleError("Qwen2 with use_sliding_window=true is not supported; set it to false")
    elif attention_bias and arch != "DeciLMForCausalLM":
        raise PuzzleError("attention_bias=true (bias on o_proj too) is not supported for Llama/Mistral")
    if arch == "MistralForCausalLM":
        window = _int(hf, "sliding_window") if hf.get("sliding_window") is not None else None
        if window is not None and window < max_pos:
            raise PuzzleError(
                f"sliding_window={window} is smaller than max_position_embeddings={max_pos}; "
                "sliding-window attention is not supported: set sliding_window to null"
            )
    if arch == "DeciLMForCausalLM":
        raw = hf.get("block_configs")
        if not isinstance(raw, list) or len(raw) != n_layers:
            raise PuzzleError(
                f"block_configs must be a list with one entry per layer ({n_layers}); fix config.json"
            )
        blocks = _nemotron_blocks(raw, n_heads, hidden)
        # Re-export writes each layer's ffn_mult as it was (1.0, not the 1.03125 its size maps back to).
        mults = [(e.get("ffn") or {}).get("ffn_mult") for e in raw]
        extra = {NEMOTRON_FFN_MULT: mults} if any(m is not None for m in mults) else {}
    else:
        n_kv = _int(hf, "num_key_value_heads", n_heads)
        if n_kv <= 0 or n_heads % n_kv:
            raise PuzzleError(
                f"num_key_value_heads={n_kv} does not divide num_attention_heads={n_heads}; fix config.json"
            )
        blocks = uniform_blocks(n_layers, n_kv, _int(hf, "intermediate_size"))
        extra = {}
    theta, scaling = _rope(hf)
    return ModelConfig(
        vocab_size=_int(hf, "vocab_size"), hidden_size=hidden, num_attention_heads=n_heads, blocks=blocks,
        head_dim=head_dim, max_position_embeddings=max_pos, rms_norm_eps=_number(hf, "rms_norm_eps", 1e-6),
        rope_theta=theta, rope_scaling=scaling, tie_word_embeddings=_flag(hf, "tie_word_embeddings"),
        attention_bias=attention_bias, bos_token_id=_token_ids(hf, "bos_token_id"),
        eos_token_id=_token_ids(hf, "eos_token_id"), pad_token_id=_token_ids(hf, "pad_token_id"),
        source_architecture=arch, extra=extra,
    )


# ---- config translation: ModelConfig -> HF ------------------------------------------------------------


def _common_hf(config: ModelConfig) -> dict[str, Any]:
    rope_scaling = dict(config.rope_scaling) if config.rope_scaling else None
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_layers,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "hidden_act": "silu",
        "mlp_bias": False,
        "attention_bias": config.attention_bias,
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        # Both spellings: transformers 5 reads rope_parameters, vLLM and older tools read rope_theta/rope_scaling.
        "rope_theta": config.rope_theta,
        # No "rope_scaling": null: transformers warns (FutureWarning) on every load of a config that sets it.
        **({"rope_scaling": rope_scaling} if rope_scaling else {}),
        "rope_parameters": {"rope_theta": config.rope_theta, **(rope_scaling or {"rope_type": "default"})},
        "use_cache": True,
        "dtype": "float32",
    }


def config_to_nemotron(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json in the Nemotron-NAS (DeciLM) schema, loading our bundled remote code."""
    data = {
        "architectures": ["DeciLMForCausalLM"],
        "model_type": "nemotron-nas",
        "auto_map": {
            "AutoConfig": "configuration_decilm.DeciLMConfig",
            "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM",
        },
        **_common_hf(config),
        # Per-layer sizes live in block_configs; NVIDIA's configs set the global ones to null, and tools that read a
        # non-null num_key_value_heads first would take it for every layer.
        "intermediate_size": None,
        "num_key_value_heads": None,
        "block_configs": [block_to_nemotron(b, config.num_attention_heads, config.hidden_size, _kept_mult(config, i))
                          for i, b in enumerate(config.blocks)],
    }
    data["dtype"] = data["torch_dtype"] = str(dtype).removeprefix("torch.")
    return data


def _kept_mult(config: ModelConfig, layer: int) -> float | None:
    kept = config.extra.get(NEMOTRON_FFN_MULT) or []
    return kept[layer] if layer < len(kept) else None


def is_homogeneous_llama(config: ModelConfig) -> bool:
    first = config.blocks[0]
    return first.attention.kind == "gqa" and first.ffn.kind == "swiglu" and all(b == first for b in config.blocks)


def config_to_llama(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json for a plain LlamaForCausalLM (or Qwen2 when the model has q/k/v bias)."""
    if not is_homogeneous_llama(config):
        raise PuzzleError("only a homogeneous GQA+SwiGLU model can be exported as Llama; use --format nemotron-nas")
    first = config.blocks[0]
    data = _common_hf(config)
    data.update(num_key_value_heads=first.attention.num_kv_heads, intermediate_size=first.ffn.intermediate_size)
    if config.attention_bias:  # q/k/v bias without o bias is Qwen2's layout, not Llama's
        data.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False,
                    sliding_window=None, attention_bias=True)
    else:
        data.update(architectures=["LlamaForCausalLM"], model_type="llama", pretraining_tp=1)
    data["dtype"] = data["torch_dtype"] = str(dtype).removeprefix("torch.")  # torch_dtype: for older tooling
    return data


# ---- weights on disk -----------------------------------------------------------------------------------


def read_json_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PuzzleError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PuzzleError(f"{path} is not valid JSON ({e}); fix or re-download it") from None
    if not isinstance(data, dict):
        raise PuzzleError(f"{path} must hold a JSON object; fix or re-download it")
    return data


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except (SafetensorError, OSError, ValueError) as e:
        raise PuzzleError(
            f"{path} is not a readable safetensors file ({str(e).splitlines()[0]}); it may be truncated: re-download it"
        ) from None


def _read_torch_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError) as e:  # zip/pickle damage
        raise PuzzleError(f"{path} is not a readable PyTorch weights file ({e}); re-download it") from None
    if not isinstance(data, dict):
        raise PuzzleError(f"{path} does not hold a state dict; re-download it")
    return data


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files of an HF directory: sharded or single safetensors, else pytorch_model*.bin."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = model_dir / index_name
        if index.exists():
            weight_map = read_json_file(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise PuzzleError(f"{index} has no 'weight_map'; re-download the checkpoint")
            files = [model_dir / f for f in sorted(set(weight_map.values()))]
            for f in files:
                if not f.exists():
                    raise PuzzleError(f"shard {f.name} listed in {index.name} is missing from {model_dir}; re-download it")
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (model_dir / name).exists():
            return [model_dir / name]
    shards = sorted(model_dir.glob("model-*-of-*.safetensors"))
    if shards:
        return shards
    return []


def read_hf_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    files = weight_files(model_dir)
    if not files:
        raise PuzzleError(
            f"{model_dir} has a config.json but no weights (model.safetensors, shards with an index, or "
            "pytorch_model.bin); add them, or use `puzzle inspect` for the config alone"
        )
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(_read_safetensors(f) if f.suffix == ".safetensors" else _read_torch_bin(f))
    return tensors
