"""The Nemotron-NAS (DeciLM) `block_configs` schema <-> BlockConfig, validated field by field.

One `block_configs` entry per layer:
  {"attention": {"n_heads_in_group": int | null, "no_op": bool, "replace_with_linear": bool, ...},
   "ffn": {"intermediate_size": int | null, "ffn_mult": float | null, "no_op": bool, "replace_with_linear": bool}}
Reading is strict: a wrong type (a string for a number, 1 for true), a size <= 0, a group that does not divide
the heads or a contradictory pair of flags is an error, never a guess. Errors name the field; the caller
(`hf.config_from_hf`) adds the layer.
"""

from __future__ import annotations

import json
import math
from typing import Any

from puzzle.core.errors import PuzzleError
from puzzle.model.blocks import AttentionConfig, BlockConfig, FFNConfig, check_keys
from puzzle.model.kinds import ffn_kind, ffn_mult_to_intermediate_size, intermediate_size_to_ffn_mult

__all__ = [
    "block_from_nemotron",
    "block_to_nemotron",
    "ffn_mult_to_intermediate_size",
    "intermediate_size_to_ffn_mult",
    "json_value",
    "nemotron_ffn_missing",
]

ATTENTION_KEYS = {
    "n_heads_in_group", "no_op", "replace_with_linear", "sparsify", "num_sink_tokens",
    "use_prefill_window_in_sink_attention", "unshifted_sink", "window_length",
}
FFN_KEYS = {"ffn_mult", "intermediate_size", "no_op", "replace_with_linear", "sparsify"}
FLAGS = ("no_op", "replace_with_linear", "use_prefill_window_in_sink_attention", "unshifted_sink")
EXAMPLE = {"attention": '{"n_heads_in_group": 8} or {"no_op": true}',
           "ffn": '{"intermediate_size": 14336} or {"no_op": true}'}


def block_to_nemotron(block: BlockConfig, num_attention_heads: int, hidden_size: int,
                      kept_ffn_mult: float | None = None) -> dict[str, Any]:
    """One entry of DeciLM's `block_configs`.

    `intermediate_size` is written exactly; `ffn_mult` is written too, because vLLM, SGLang, TensorRT-LLM and
    llama.cpp's converter derive the size from it alone (exact whenever the size is a multiple of 256; otherwise it
    names the next multiple up, so those engines fail on the weight shapes instead of loading a wrong model).
    `kept_ffn_mult`, an imported checkpoint's own value, is written instead when it still gives this size.
    """
    att = block.attention
    attention = {
        "n_heads_in_group": num_attention_heads // att.num_kv_heads if att.kind == "gqa" else None,
        "no_op": att.kind == "no_op",
        "replace_with_linear": att.kind == "linear",
        "sparsify": None,
        "num_sink_tokens": None,
        "use_prefill_window_in_sink_attention": False,
        "unshifted_sink": False,
        "window_length": None,
    }
    spec = ffn_kind(block.ffn.kind)
    if spec.nemotron is None:
        raise PuzzleError(f"FFN kind {block.ffn.kind!r} has no Nemotron-NAS mapping; write the model in the native "
                          "format (puzzle.formats.save_model)")
    ffn = spec.nemotron(block.ffn, hidden_size)
    if (kept_ffn_mult is not None and block.ffn.kind == "swiglu"
            and ffn_mult_to_intermediate_size(kept_ffn_mult, hidden_size) == block.ffn.intermediate_size):
        ffn["ffn_mult"] = kept_ffn_mult
    return {"attention": attention, "ffn": ffn}


def block_from_nemotron(entry: Any, num_attention_heads: int, hidden_size: int) -> BlockConfig:
    """The BlockConfig of one `block_configs` entry; PuzzleError naming the field and the fix."""
    if not isinstance(entry, dict):
        raise PuzzleError(f"must be an object with 'attention' and 'ffn', got {json_value(entry)}")
    check_keys("block_configs entry", entry, {"attention", "ffn"})
    for part in ("attention", "ffn"):
        if not isinstance(entry.get(part), dict):
            got = "nothing" if part not in entry else json_value(entry[part])
            raise PuzzleError(f"needs an '{part}' object, got {got}; e.g. {EXAMPLE[part]}")
    att, ffn = entry["attention"], entry["ffn"]
    check_keys("block_configs attention", att, ATTENTION_KEYS)
    check_keys("block_configs ffn", ffn, FFN_KEYS)
    for part, fields in (("attention", att), ("ffn", ffn)):
        for key in FLAGS:
            if fields.get(key) is not None and not isinstance(fields[key], bool):
                raise PuzzleError(f"{part}.{key} must be true or false, got {json_value(fields[key])}")
        if fields.get("no_op") and fields.get("replace_with_linear"):
            raise PuzzleError(f"{part} has both no_op and replace_with_linear true; set one of them to false")
    for part, key in (("attention", "window_length"), ("attention", "num_sink_tokens"), ("attention", "sparsify"),
                      ("ffn", "sparsify")):
        if entry[part].get(key):
            raise PuzzleError(f"{part}.{key}={json_value(entry[part][key])}: windowed, sink or sparsified blocks are not "
                              "supported; only plain GQA, linear and no-op blocks are")
    return BlockConfig(_attention(att, num_attention_heads), _ffn(ffn, hidden_size))


def _attention(att: dict[str, Any], num_attention_heads: int) -> AttentionConfig:
    if att.get("no_op"):
        return AttentionConfig.no_op()
    if att.get("replace_with_linear"):
        return AttentionConfig.linear()
    group = att.get("n_heads_in_group")
    if group is None:
        raise PuzzleError("attention.n_heads_in_group is missing; set it to query heads per KV head "
                          f"(a divisor of num_attention_heads={num_attention_heads}), or set no_op true")
    _check_positive_int("attention.n_heads_in_group", group)
    if num_attention_heads % group:
        raise PuzzleError(f"attention.n_heads_in_group={group} does not divide num_attention_heads="
                          f"{num_attention_heads}; use one of {_divisors(num_attention_heads)}")
    return AttentionConfig.gqa(num_attention_heads // group)


def _ffn(ffn: dict[str, Any], hidden_size: int) -> FFNConfig:
    if ffn.get("no_op"):
        return FFNConfig.no_op()
    if ffn.get("replace_with_linear"):
        return FFNConfig.linear()
    size, mult = ffn.get("intermediate_size"), ffn.get("ffn_mult")
    if size is not None:
        _check_positive_int("ffn.intermediate_size", size)
    if mult is not None and (isinstance(mult, bool) or not isinstance(mult, (int, float))
                             or not math.isfinite(mult) or mult <= 0):
        raise PuzzleError(f"ffn.ffn_mult must be a positive number, got {json_value(mult)}")
    if size is not None:
        return FFNConfig.swiglu(size)
    if mult is not None:
        return FFNConfig.swiglu(ffn_mult_to_intermediate_size(float(mult), hidden_size))
    raise PuzzleError("ffn needs 'intermediate_size' or 'ffn_mult' (or no_op / replace_with_linear true)")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PuzzleError(f"{name} must be a positive integer, got {json_value(value)}")


def json_value(value: Any) -> str:
    """A value as config.json spells it, with its JSON type where that is the problem ("2.0" (a string))."""
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
    kind = {str: "a string", bool: "a boolean", list: "a list", dict: "an object"}.get(type(value))
    return f"{text} ({kind})" if kind else text


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def nemotron_ffn_missing(blocks: list[BlockConfig]) -> dict[int, str]:
    """Layer -> FFN kind, for the layers whose kind has no Nemotron-NAS mapping (`puzzle.model.kinds`)."""
    return {i: b.ffn.kind for i, b in enumerate(blocks) if ffn_kind(b.ffn.kind).nemotron is None}
