"""The architecture as data: per-layer block configs and the whole-model config (Nemotron-NAS mapping:
puzzle.formats.nemotron_nas).

A Puzzle child keeps the parent's depth; each layer chooses one attention and one FFN variant:
  attention: gqa(num_kv_heads) | linear | no_op
  ffn:       swiglu(intermediate_size) | linear | no_op | a kind registered in puzzle.model.kinds
Everything here is frozen, validated on construction and JSON round-trippable.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from puzzle.core.errors import PuzzleError
from puzzle.model.kinds import ffn_kind

AttentionKind = Literal["gqa", "linear", "no_op"]
FFNKind = str  # a kind registered in puzzle.model.kinds: built in "swiglu", "linear", "no_op"


def check_keys(kind: str, data: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise PuzzleError(
            f"unknown key(s) {unknown} in {kind} config; allowed keys are {sorted(allowed)}"
        )


@dataclass(frozen=True)
class AttentionConfig:
    kind: AttentionKind
    num_kv_heads: int | None = None  # only for kind == "gqa"

    def __post_init__(self) -> None:
        if self.kind not in ("gqa", "linear", "no_op"):
            raise PuzzleError(f"unknown attention kind {self.kind!r}; use 'gqa', 'linear' or 'no_op'")
        if self.kind == "gqa":
            if not isinstance(self.num_kv_heads, int) or self.num_kv_heads <= 0:
                raise PuzzleError(f"gqa attention needs a positive num_kv_heads, got {self.num_kv_heads!r}")
        elif self.num_kv_heads is not None:
            raise PuzzleError(f"{self.kind} attention takes no num_kv_heads (got {self.num_kv_heads})")

    @classmethod
    def gqa(cls, num_kv_heads: int) -> AttentionConfig:
        return cls("gqa", num_kv_heads)

    @classmethod
    def linear(cls) -> AttentionConfig:
        return cls("linear")

    @classmethod
    def no_op(cls) -> AttentionConfig:
        return cls("no_op")

    @property
    def name(self) -> str:
        """Short stable name used in file names and tables, e.g. 'gqa4', 'linear', 'no_op'."""
        return f"gqa{self.num_kv_heads}" if self.kind == "gqa" else self.kind

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_kv_heads": self.num_kv_heads} if self.kind == "gqa" else {"kind": self.kind}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttentionConfig:
        check_keys("attention", data, {"kind", "num_kv_heads"})
        return cls(data.get("kind"), data.get("num_kv_heads"))  # type: ignore[arg-type]


@dataclass(frozen=True)
class FFNConfig:
    kind: FFNKind
    intermediate_size: int | None = None  # only for sized kinds (swiglu)

    def __post_init__(self) -> None:
        if ffn_kind(self.kind).sized:
            if not isinstance(self.intermediate_size, int) or self.intermediate_size <= 0:
                raise PuzzleError(
                    f"{self.kind} ffn needs a positive intermediate_size, got {self.intermediate_size!r}"
                )
        elif self.intermediate_size is not None:
            raise PuzzleError(f"{self.kind} ffn takes no intermediate_size (got {self.intermediate_size})")

    @classmethod
    def swiglu(cls, intermediate_size: int) -> FFNConfig:
        return cls("swiglu", intermediate_size)

    @classmethod
    def linear(cls) -> FFNConfig:
        return cls("linear")

    @classmethod
    def no_op(cls) -> FFNConfig:
        return cls("no_op")

    @property
    def name(self) -> str:
        """Short stable name, e.g. 'swiglu768', 'linear', 'no_op'."""
        return f"{self.kind}{self.intermediate_size}" if self.intermediate_size is not None else self.kind

    def to_dict(self) -> dict[str, Any]:
        if self.intermediate_size is not None:
            return {"kind": self.kind, "intermediate_size": self.intermediate_size}
        return {"kind": self.kind}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FFNConfig:
        check_keys("ffn", data, {"kind", "intermediate_size"})
        return cls(data.get("kind"), data.get("intermediate_size"))  # type: ignore[arg-type]


@dataclass(frozen=True)
class BlockConfig:
    """One layer of a child: an attention variant and an FFN variant."""

    attention: AttentionConfig
    ffn: FFNConfig

    @property
    def name(self) -> str:
        return f"{self.attention.name}+{self.ffn.name}"

    def to_dict(self) -> dict[str, Any]:
        return {"attention": self.attention.to_dict(), "ffn": self.ffn.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BlockConfig:
        check_keys("block", data, {"attention", "ffn"})
        if "attention" not in data or "ffn" not in data:
            raise PuzzleError("a block config needs both 'attention' and 'ffn'")
        return cls(AttentionConfig.from_dict(data["attention"]), FFNConfig.from_dict(data["ffn"]))


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a heterogeneous decoder; `blocks` has one entry per layer."""

    vocab_size: int
    hidden_size: int
    num_attention_heads: int
    blocks: tuple[BlockConfig, ...]
    head_dim: int | None = None  # default hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3", "factor": ..., ...} or None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias, as in Qwen2
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    source_architecture: str = "LlamaForCausalLM"  # what it was imported from; informational
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # e.g. generation defaults

    def __post_init__(self) -> None:
        if isinstance(self.blocks, list):
            object.__setattr__(self, "blocks", tuple(self.blocks))
        for name in ("vocab_size", "hidden_size", "num_attention_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise PuzzleError(f"model config: {name} must be a positive integer, got {value!r}")
        if not self.blocks:
            raise PuzzleError("model config: a model needs at least one layer")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise PuzzleError(
                    f"model config: num_attention_heads={self.num_attention_heads} does not divide "
                    f"hidden_size={self.hidden_size}; set head_dim explicitly or fix the head count"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.head_dim % 2:
            raise PuzzleError(f"model config: head_dim={self.head_dim} must be even for rotary embeddings")
        for i, block in enumerate(self.blocks):
            att = block.attention
            if att.kind == "gqa" and (att.num_kv_heads > self.num_attention_heads
                                      or self.num_attention_heads % att.num_kv_heads):
                raise PuzzleError(
                    f"layer {i}: num_kv_heads={att.num_kv_heads} must divide "
                    f"num_attention_heads={self.num_attention_heads}"
                )
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type", "default") not in (
            "llama3", "default"
        ):
            raise PuzzleError(
                f"rope_scaling type {self.rope_scaling.get('rope_type')!r} is not supported; "
                "supported: default, llama3"
            )

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def with_blocks(self, blocks: list[BlockConfig] | tuple[BlockConfig, ...]) -> ModelConfig:
        return replace(self, blocks=tuple(blocks))

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "blocks"}
        data["blocks"] = [b.to_dict() for b in self.blocks]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        allowed = {f.name for f in fields(cls)}
        check_keys("model", data, allowed)
        data = dict(data)
        data["blocks"] = tuple(BlockConfig.from_dict(b) for b in data.get("blocks", []))
        return cls(**data)

    # ---- sizes used by inspect, costs and the memory model ------------------------------------------

    def block_param_count(self, block: BlockConfig) -> int:
        """Parameters one layer owns (norms included, as the model creates them)."""
        h, d, nq = self.hidden_size, self.head_dim, self.num_attention_heads
        return attention_param_count(block.attention, h, d, nq, self.attention_bias) + ffn_param_count(
            block.ffn, h
        )

    def embedding_param_count(self) -> int:
        """vocab x hidden: the embedding table; the LM head has as many (its own matrix only when untied)."""
        return self.vocab_size * self.hidden_size

    def fixed_param_count(self) -> int:
        """Parameters outside the layers: the embedding table, the final norm and, when untied, the LM head."""
        embed = self.embedding_param_count()
        return embed + (0 if self.tie_word_embeddings else embed) + self.hidden_size

    def param_count(self) -> int:
        return self.fixed_param_count() + sum(self.block_param_count(b) for b in self.blocks)

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V bytes one token adds to the cache, summed over layers."""
        return sum(
            2 * b.attention.num_kv_heads * self.head_dim * dtype_bytes
            for b in self.blocks
            if b.attention.kind == "gqa"
        )


def attention_param_count(att: AttentionConfig, hidden: int, head_dim: int, n_heads: int, bias: bool) -> int:
    if att.kind == "no_op":
        return 0
    if att.kind == "linear":
        return hidden + hidden * hidden  # norm + one hidden x hidden matrix
    q = hidden * n_heads * head_dim + (n_heads * head_dim if bias else 0)
    kv = 2 * (hidden * att.num_kv_heads * head_dim + (att.num_kv_heads * head_dim if bias else 0))
    o = n_heads * head_dim * hidden
    return hidden + q + kv + o


def ffn_param_count(ffn: FFNConfig, hidden: int) -> int:
    """The sub-block's parameters: its norm and its kind's module (none for no_op)."""
    spec = ffn_kind(ffn.kind)
    return hidden + spec.param_count(hidden, ffn.intermediate_size) if spec.has_module else 0


def uniform_blocks(num_layers: int, num_kv_heads: int, intermediate_size: int) -> tuple[BlockConfig, ...]:
    """The homogeneous block list of a plain Llama-style parent."""
    block = BlockConfig(AttentionConfig.gqa(num_kv_heads), FFNConfig.swiglu(intermediate_size))
    return tuple(block for _ in range(num_layers))

