"""Nemotron-NAS (DeciLM) configuration, written by the `puzzle` package; needs only transformers.

Each entry of `block_configs` describes one layer:
    attention: {n_heads_in_group: int | None, no_op: bool, replace_with_linear: bool, ...}
    ffn:       {intermediate_size: int | None, ffn_mult: float | None, no_op: bool, replace_with_linear: bool, ...}
RoPE settings are kept in `rope_parameters` (rope_theta plus the llama3 scaling fields when present).
Entries become `BlockFields` objects (attribute and mapping access); `to_dict` writes them back unchanged.
"""

from __future__ import annotations

from typing import Any, ClassVar

try:  # transformers >= 5 spells it PreTrainedConfig; the old alias remains for a while
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:  # pragma: no cover
    from transformers import PretrainedConfig as _BaseConfig


def _rope_parameters(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Merge transformers-5 `rope_parameters` and legacy `rope_theta` + `rope_scaling` into one dict."""
    theta = kwargs.pop("rope_theta", None)
    scaling = kwargs.pop("rope_scaling", None)
    params = kwargs.pop("rope_parameters", None)
    merged: dict[str, Any] = {}
    if isinstance(scaling, dict):
        merged.update(scaling)
    if isinstance(params, dict):
        merged.update(params)
    if "type" in merged and "rope_type" not in merged:
        merged["rope_type"] = merged.pop("type")
    merged.pop("type", None)
    merged.setdefault("rope_type", "default")
    merged.setdefault("rope_theta", float(theta) if theta is not None else 10000.0)
    return merged


class DeciLMConfig(_BaseConfig):
    model_type = "nemotron-nas"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values", "cache"]  # "cache" from 5.24

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        num_attention_heads: int = 32,
        num_hidden_layers: int = 32,
        head_dim: int | None = None,
        max_position_embeddings: int = 2048,
        rms_norm_eps: float = 1e-5,
        attention_bias: bool = False,
        tie_word_embeddings: bool = False,
        block_configs: list[dict[str, Any]] | None = None,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        hidden_act: str = "silu",
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_hidden_layers = num_hidden_layers
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.attention_bias = attention_bias
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.hidden_act = hidden_act
        # Objects with attribute access (`block.attention.no_op`), as NVIDIA's DeciLMConfig gives and vLLM, SGLang
        # and TensorRT-LLM read them; `to_dict` writes them back as the plain JSON objects they came from.
        self.block_configs = [BlockFields(b if isinstance(b, dict) else _as_dict(b)) for b in (block_configs or [])]
        # Older tooling spells the dtype `torch_dtype`; transformers 5 reads `dtype` and warns on the old name.
        torch_dtype = kwargs.pop("torch_dtype", None)
        if torch_dtype is not None and kwargs.get("dtype") is None:
            kwargs["dtype"] = torch_dtype
        # Set as a plain attribute (never through the deprecated `rope_scaling` property of transformers 5).
        rope = _rope_parameters(kwargs)
        self.rope_parameters = rope
        self.rope_theta = rope["rope_theta"]
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.rope_parameters = rope  # the base __init__ may standardise it; keep our exact values


    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["block_configs"] = [_as_dict(b) for b in self.block_configs]
        return out


class BlockFields:
    """One `block_configs` entry, or its `attention` / `ffn` part: attribute access (`block.ffn.ffn_mult`) and
    mapping access (`block["ffn"]`, `block.get("ffn")`) over the same JSON fields."""

    def __init__(self, data: dict[str, Any]) -> None:
        for key, value in data.items():
            setattr(self, key, BlockFields(value) if isinstance(value, dict) else value)

    def get(self, key: str, default: Any = None) -> Any:
        return vars(self).get(key, default)

    def __getitem__(self, key: str) -> Any:
        return vars(self)[key]

    def __contains__(self, key: object) -> bool:
        return key in vars(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockFields) and self.to_dict() == other.to_dict()

    def to_dict(self) -> dict[str, Any]:
        return {k: v.to_dict() if isinstance(v, BlockFields) else v for k, v in vars(self).items()}

    def __repr__(self) -> str:
        return f"BlockFields({self.to_dict()!r})"


def _as_dict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return dict(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return {k: _as_dict(v) if hasattr(v, "__dict__") else v for k, v in vars(obj).items()}
