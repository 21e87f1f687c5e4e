"""The BLD search space: which attention and FFN variants every layer gets, validated against the parent."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from puzzle.core.errors import PuzzleError
from puzzle.model.blocks import AttentionConfig, BlockConfig, FFNConfig, ModelConfig
from puzzle.model.kinds import ffn_kinds

DEFAULT_FFN_FRACTIONS = [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.1]


@dataclass
class SearchSpaceConfig:
    # KV-head counts for GQA variants; None = every count that divides the query heads, up to the parent's.
    attention_kv_heads: list[int] | None = None
    attention_linear: bool = True
    attention_no_op: bool = True
    # Fractions of the parent's intermediate size, rounded to a multiple of `round_to` (64 small, 256 at 8B).
    ffn_fractions: list[float] = field(default_factory=lambda: list(DEFAULT_FFN_FRACTIONS))
    ffn_linear: bool = True
    ffn_no_op: bool = True
    # More FFN variants for every layer, by name, of any registered kind (puzzle.model.kinds), e.g. ["relu2128"].
    ffn_variants: list[str] = field(default_factory=list)
    round_to: int = 64
    # decoupled: |A|+|F| per layer; coupled: the (attention, FFN) pairs in `pairs`, or all |A|x|F| if empty.
    mode: Literal["decoupled", "coupled"] = "decoupled"
    pairs: list[str] = field(default_factory=list)  # e.g. ["gqa2+swiglu256", "no_op+linear"]
    layers: list[int] | None = None  # None = every layer

    def __post_init__(self) -> None:
        where = "library.search_space"
        if self.round_to <= 0:
            raise PuzzleError(f"{where}.round_to must be positive, got {self.round_to}")
        for f in self.ffn_fractions:
            if not 0.0 < f <= 1.0:
                raise PuzzleError(f"{where}.ffn_fractions: {f} is outside (0, 1]; a variant cannot be larger than "
                                  "the parent's FFN (1.0 is the parent's size)")
        for k in self.attention_kv_heads or []:
            if k <= 0:
                raise PuzzleError(f"{where}.attention_kv_heads: {k} KV heads; use positive divisors of the "
                                  "query heads, at most the parent's KV heads")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise PuzzleError(f"{where}.layers {self.layers} must name layers 0, 1, ... (or be unset for all)")
        for pair in self.pairs:
            parse_pair(pair)
        for name in self.ffn_variants:
            parse_ffn(name)
        if self.pairs and self.mode != "coupled":
            raise PuzzleError(f"{where}.pairs is set but mode is 'decoupled'; set mode=coupled")


@dataclass(frozen=True)
class LayerSpace:
    """What one layer trains. In decoupled mode `blocks` is empty; in coupled mode the lists are empty."""

    layer: int
    parent: BlockConfig
    attention: tuple[AttentionConfig, ...]
    ffn: tuple[FFNConfig, ...]
    blocks: tuple[BlockConfig, ...]


def parse_attention(name: str) -> AttentionConfig:
    if name in ("linear", "no_op"):
        return AttentionConfig(name)  # type: ignore[arg-type]
    if name.startswith("gqa") and name[3:].isdigit():
        return AttentionConfig.gqa(int(name[3:]))
    raise PuzzleError(f"unknown attention variant {name!r}; use gqaK (e.g. gqa2), 'linear' or 'no_op'")


def parse_ffn(name: str) -> FFNConfig:
    """A variant name of any registered FFN kind: the kind's name, then its size for sized kinds ('swiglu256')."""
    kinds = ffn_kinds()
    for kind, spec in kinds.items():
        if not spec.sized and name == kind:
            return FFNConfig(kind)
        if spec.sized and name.startswith(kind) and name[len(kind):].isdigit():
            return FFNConfig(kind, int(name[len(kind):]))
    choices = [f"{k}N" if s.sized else repr(k) for k, s in kinds.items()]
    choices[0] += " (e.g. swiglu256)"
    raise PuzzleError(f"unknown FFN variant {name!r}; use {', '.join(choices[:-1])} or {choices[-1]}")


def parse_pair(text: str) -> BlockConfig:
    if text.count("+") != 1:
        raise PuzzleError(f"coupled pair {text!r} must look like 'gqa2+swiglu256' (attention+ffn)")
    att, ffn = text.split("+")
    return BlockConfig(parse_attention(att.strip()), parse_ffn(ffn.strip()))


def _kv_choices(cfg: SearchSpaceConfig, model: ModelConfig, parent: AttentionConfig, layer: int) -> list[int]:
    nq = model.num_attention_heads
    if cfg.attention_kv_heads is None:  # the paper's Nemotron children use 8, 4, 2 and 1 of the parent's 8
        return [k for k in range(parent.num_kv_heads, 0, -1) if nq % k == 0]
    for k in cfg.attention_kv_heads:
        _check_kv(k, model, parent, layer)
    return list(cfg.attention_kv_heads)


def _check_kv(k: int, model: ModelConfig, parent: AttentionConfig, layer: int) -> None:
    if k <= 0 or model.num_attention_heads % k or k > parent.num_kv_heads:
        fits = [d for d in range(1, parent.num_kv_heads + 1) if model.num_attention_heads % d == 0]
        raise PuzzleError(
            f"layer {layer}: {k} KV heads do not fit the parent ({model.num_attention_heads} query heads, "
            f"{parent.num_kv_heads} KV heads); use divisors of the query heads up to the parent's, {fits}, in "
            "library.search_space.attention_kv_heads"
        )


def ffn_sizes(cfg: SearchSpaceConfig, parent_size: int) -> list[int]:
    """Intermediate sizes for the fractions: multiples of round_to, at least one multiple, at most the parent."""
    sizes = []
    for f in cfg.ffn_fractions:  # each in (0, 1], round_to > 0: checked by SearchSpaceConfig
        if f == 1.0:
            sizes.append(parent_size)
            continue
        n = max(cfg.round_to, round(f * parent_size / cfg.round_to) * cfg.round_to)
        sizes.append(min(n, parent_size))
    return list(dict.fromkeys(sizes))


def _check_ffn(ffn: FFNConfig, parent: FFNConfig, layer: int) -> None:
    if ffn.kind == "swiglu" and (parent.kind != "swiglu" or ffn.intermediate_size > parent.intermediate_size):
        raise PuzzleError(
            f"layer {layer}: FFN {ffn.name} is larger than the parent's {parent.name}; "
            "variants must be at most the parent's intermediate size"
        )


def layer_spaces(cfg: SearchSpaceConfig, model: ModelConfig) -> list[LayerSpace]:
    """The validated variants of every selected layer. The parent's own sub-blocks are always included."""
    layers = list(range(model.num_layers)) if cfg.layers is None else list(cfg.layers)
    bad = [i for i in layers if not 0 <= i < model.num_layers]
    if bad or not layers:
        raise PuzzleError(
            f"library.search_space.layers {cfg.layers} must name layers in 0..{model.num_layers - 1}"
        )
    pairs = [parse_pair(p) for p in cfg.pairs]
    spaces = []
    for i in sorted(set(layers)):
        parent = model.blocks[i]
        atts: list[AttentionConfig] = [parent.attention]
        if parent.attention.kind == "gqa":
            atts += [AttentionConfig.gqa(k) for k in _kv_choices(cfg, model, parent.attention, i)]
        if cfg.attention_linear and parent.attention.kind != "no_op":
            atts.append(AttentionConfig.linear())
        if cfg.attention_no_op:
            atts.append(AttentionConfig.no_op())
        ffns: list[FFNConfig] = [parent.ffn]
        if parent.ffn.kind == "swiglu":
            ffns += [FFNConfig.swiglu(n) for n in ffn_sizes(cfg, parent.ffn.intermediate_size)]
        if cfg.ffn_linear and parent.ffn.kind != "no_op":
            ffns.append(FFNConfig.linear())
        if parent.ffn.kind != "no_op":
            ffns += [parse_ffn(name) for name in cfg.ffn_variants]
        if cfg.ffn_no_op:
            ffns.append(FFNConfig.no_op())
        atts, ffns = list(dict.fromkeys(atts)), list(dict.fromkeys(ffns))
        if cfg.mode == "decoupled":
            spaces.append(LayerSpace(i, parent, tuple(atts), tuple(ffns), ()))
            continue
        chosen = pairs or [BlockConfig(a, f) for a in atts for f in ffns]
        for b in chosen:
            if b.attention.kind == "gqa":
                if parent.attention.kind != "gqa":
                    raise PuzzleError(f"layer {i}: the parent has no GQA attention to initialise {b.name} from")
                _check_kv(b.attention.num_kv_heads, model, parent.attention, i)
            _check_ffn(b.ffn, parent.ffn, i)
        blocks = list(dict.fromkeys([parent, *chosen]))
        spaces.append(LayerSpace(i, parent, (), (), tuple(blocks)))
    return spaces
