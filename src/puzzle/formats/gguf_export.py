"""Write a model as a GGUF file for llama.cpp / Ollama: `llama` for a homogeneous model, `deci` for a child.

Layout as llama.cpp's convert_hf_to_gguf.py writes it (LlamaModel, DeciModel) and its loaders read it:
  - q/k rows permuted per head for llama.cpp's RoPE (halves -> interleaved pairs: LlamaModel.permute);
  - `deci`: per-layer arrays `deci.attention.head_count` (0: no-op attention), `deci.attention.head_count_kv`
    (0 with heads > 0: linear attention, its map stored as `attn_output`) and `deci.feed_forward_length`
    (0: no FFN), written from our exact sizes (any size, not only what ffn_mult can express);
  - llama3 RoPE scaling as the `rope_freqs.weight` factors; norms in F32, matrices in F16 / BF16 / Q8_0
    (Q8_0 needs rows of a multiple of 32 values; other matrices stay F16, as the converter does);
  - the tokenizer and chat template in the metadata (`puzzle.formats.gguf_tokenizer`).
llama.cpp's `deci` cannot take a linear FFN or an attention layer without an FFN (`puzzle.formats.engines`):
such a child is refused with the layers named. The reader side is `puzzle.formats.gguf`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from puzzle.core.artifacts import atomic_path
from puzzle.core.errors import PuzzleError
from puzzle.formats.engines import require_servable
from puzzle.formats.gguf import LAYER_NAMES, TOP_NAMES, _gguf
from puzzle.formats.gguf_tokenizer import add_tokenizer
from puzzle.formats.hf import is_homogeneous_llama
from puzzle.model.blocks import ModelConfig
from puzzle.model.decoder import PuzzleModel

GGUF_TYPES = ("f16", "bf16", "q8_0")
_QBLOCK = 32  # Q8_0 block: 32 values along a row
GGUF_FIX = "export it with --format nemotron-nas instead, or search again with search.serve_with: [llama.cpp]"


def interleave_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order: per head, rows (i, i + D/2) -> (2i, 2i + 1). w: [n_heads * D, ...] (weight or bias)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def llama3_rope_factors(config: ModelConfig) -> np.ndarray:
    """Per-frequency divisors of llama3 RoPE scaling ([head_dim / 2], float32), llama.cpp's `rope_freqs.weight`."""
    s = config.rope_scaling or {}
    dim, base = config.head_dim, config.rope_theta
    factor, low, high = s.get("factor", 8.0), s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_ctx = s.get("original_max_position_embeddings", 8192)
    out = []
    for k in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (k / dim)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _file_type(gguf: Any, kind: str) -> int:
    return {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]


def _add_tensor(writer: Any, gguf: Any, name: str, w: torch.Tensor, kind: str) -> None:
    arr = w.detach().to(torch.float32).cpu().numpy()
    q = gguf.GGMLQuantizationType
    if arr.ndim == 1:
        writer.add_tensor(name, arr)
    elif kind == "q8_0" and arr.shape[-1] % _QBLOCK == 0:
        writer.add_tensor(name, gguf.quants.quantize(arr, q.Q8_0), raw_dtype=q.Q8_0)
    elif kind == "bf16":
        writer.add_tensor(name, gguf.quants.quantize(arr, q.BF16), raw_dtype=q.BF16)
    else:
        writer.add_tensor(name, arr.astype(np.float16))


def _metadata(writer: Any, config: ModelConfig, deci: bool) -> None:
    blocks = config.blocks
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    if deci:
        writer.add_head_count([0 if b.attention.kind == "no_op" else config.num_attention_heads for b in blocks])
        writer.add_head_count_kv([b.attention.num_kv_heads if b.attention.kind == "gqa" else 0 for b in blocks])
        writer.add_feed_forward_length([b.ffn.intermediate_size or 0 for b in blocks])
    else:
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(blocks[0].attention.num_kv_heads)
        writer.add_feed_forward_length(blocks[0].ffn.intermediate_size)
    if config.rope_scaling and config.rope_scaling.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(config))


def _inverted(table: dict[str, str]) -> dict[str, str]:
    """GGUF stem -> ours, turned into ours -> GGUF stem; two GGUF stems for one of ours would be ambiguous."""
    out = {ours: theirs for theirs, ours in table.items()}
    if len(out) != len(table):
        raise AssertionError(f"the GGUF name table is not one-to-one: {table}")
    return out


# The import's tables inverted, so the two directions cannot drift apart. `deci` adds linear attention, whose
# map llama.cpp reads as `attn_output` (the import reads only `llama` files, which have none).
_TOP_NAMES = _inverted(TOP_NAMES)
_LAYER_NAMES = _inverted(LAYER_NAMES)
_LAYER_NAMES["attention.op.linear_attn"] = _LAYER_NAMES["attention.op.o_proj"]
_ROPE_STEMS = (".attn_q", ".attn_k")  # rows llama.cpp's RoPE reads interleaved


def gguf_name(key: str) -> str | None:
    """A puzzle state-dict key -> its GGUF tensor name, e.g. layers.3.ffn.op.up_proj.weight -> blk.3.ffn_up.weight;
    None where llama.cpp has no place for the weight."""
    stem, _, suffix = key.rpartition(".")
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{suffix}"
    parts = stem.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in _LAYER_NAMES:
        return f"blk.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    return None


def gguf_tensors(model: PuzzleModel) -> dict[str, torch.Tensor]:
    """GGUF tensor name -> tensor in llama.cpp's layout (q/k rows interleaved), for every weight of the model."""
    config = model.config
    out = {}
    for key, w in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp falls back on token_embd when `output` is absent
        name = gguf_name(key)
        if name is None:
            raise PuzzleError(f"weight {key} has no GGUF name (llama.cpp has no place for it); {GGUF_FIX}")
        stem = name.rpartition(".")[0]
        if stem.endswith(_ROPE_STEMS):
            block = config.blocks[int(stem.split(".")[1])]
            heads = config.num_attention_heads if stem.endswith(".attn_q") else block.attention.num_kv_heads
            w = interleave_rope_rows(w, heads)
        out[name] = w
    return out


def export_gguf(model: PuzzleModel, out_path: str | Path, tokenizer_source: Any = None, gguf_type: str = "f16",
                name: str = "puzzle-child") -> dict[str, Any]:
    """Write `model` to out_path (atomically, mode as the umask asks); returns {architecture, type, tokenizer}."""
    gguf = _gguf()
    if gguf_type not in GGUF_TYPES:
        raise PuzzleError(f"unknown GGUF type {gguf_type!r}; use one of {', '.join(GGUF_TYPES)}")
    config, out_path = model.config, Path(out_path)
    if out_path.is_dir():
        raise PuzzleError(f"{out_path} is a directory; give the GGUF file's name, e.g. {out_path / 'model.gguf'}")
    if any(t.is_meta for t in model.state_dict().values()):
        raise PuzzleError("cannot export a model on the meta device (it has no weights); load its weights first")
    deci = not is_homogeneous_llama(config)
    if deci:
        require_servable(config, ["llama.cpp"], GGUF_FIX)
    tensors = gguf_tensors(model)
    with atomic_path(out_path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "deci" if deci else "llama")
        writer.add_name(name)
        writer.add_file_type(_file_type(gguf, gguf_type))
        _metadata(writer, config, deci)
        eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
        tokenizer = add_tokenizer(writer, gguf, tokenizer_source, config.vocab_size,
                                  {"bos": config.bos_token_id, "eos": eos, "pad": config.pad_token_id})
        for tname, w in tensors.items():
            _add_tensor(writer, gguf, tname, w, gguf_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"architecture": "deci" if deci else "llama", "type": gguf_type, "tokenizer": tokenizer}
