"""llama2.c checkpoints (`.bin`, v0 "legacy" format) and their `tok*.bin` tokenizers.

Model file: seven int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a negative
vocab_size means the classifier is not shared with the embedding), then fp32 arrays in llama2.c's order:
token embedding, attention norms, wq, wk, wv, wo, FFN norms, w1 (gate), w2 (down), w3 (up), final norm,
two unused RoPE tables (seq_len * head_size / 2 each), and the classifier when unshared.
llama2.c rotates interleaved pairs (x0,x1),(x2,x3)...; HF (and we) rotate halves, so wq/wk rows are permuted.

Tokenizer file: int32 max_token_length, then per token: float32 score, int32 length, bytes.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from puzzle.core.errors import PuzzleError
from puzzle.formats.weights import model_from_state_dict
from puzzle.model.blocks import ModelConfig, uniform_blocks
from puzzle.model.decoder import PuzzleModel

HEADER = struct.Struct("<7i")


def read_header(path: Path) -> tuple[int, ...]:
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER.size)
    except OSError as e:
        raise PuzzleError(f"cannot read {path} ({e.strerror}); check the path") from None
    if len(raw) < HEADER.size:
        raise PuzzleError(f"{path} is too short to be a llama2.c checkpoint; it may be truncated: re-download it")
    return HEADER.unpack(raw)


def looks_like_llama2c(path: Path) -> bool:
    """A plausible v0 header whose implied size matches the file size."""
    try:
        dim, hidden, layers, heads, kv_heads, vocab, seq = read_header(path)
    except PuzzleError:
        return False
    if min(dim, hidden, layers, heads, kv_heads, seq) <= 0 or vocab == 0 or dim % heads:
        return False
    return path.stat().st_size == HEADER.size + 4 * _num_floats(dim, hidden, layers, heads, kv_heads, vocab, seq)


def _num_floats(dim: int, hidden: int, layers: int, heads: int, kv_heads: int, vocab: int, seq: int) -> int:
    head = dim // heads
    kv = kv_heads * head
    per_layer = 2 * dim + dim * dim * 2 + 2 * dim * kv + 3 * dim * hidden
    n = abs(vocab) * dim + layers * per_layer + dim + seq * head
    return n + (abs(vocab) * dim if vocab < 0 else 0)


def config_from_header(header: tuple[int, ...]) -> ModelConfig:
    dim, hidden, layers, heads, kv_heads, vocab, seq = header
    if dim <= 0 or heads <= 0 or dim % heads:
        raise PuzzleError(f"llama2.c header: n_heads={heads} does not divide dim={dim}; the file is not a valid checkpoint")
    if kv_heads <= 0 or heads % kv_heads:
        raise PuzzleError(f"llama2.c header: n_kv_heads={kv_heads} does not divide n_heads={heads}; invalid checkpoint")
    return ModelConfig(
        vocab_size=abs(vocab), hidden_size=dim, num_attention_heads=heads,
        blocks=uniform_blocks(layers, kv_heads, hidden), max_position_embeddings=seq, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=vocab > 0, bos_token_id=1, eos_token_id=2,
        source_architecture="llama2.c",
    )


def load_llama2c_config(path: Path) -> ModelConfig:
    return config_from_header(read_header(path))


def _interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq/wk [n_heads*D, dim]: per head, pairs (2i, 2i+1) -> (i, i + D/2), as HF's converter does."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def load_llama2c(path: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> PuzzleModel:
    header = read_header(path)
    config = config_from_header(header)
    dim, hidden, layers, heads, kv_heads, vocab, seq = header
    expected = HEADER.size + 4 * _num_floats(*header)
    if path.stat().st_size != expected:
        raise PuzzleError(
            f"{path} is {path.stat().st_size} bytes but its header implies {expected}; the file is truncated "
            "or not a llama2.c v0 checkpoint: re-export it"
        )
    data = torch.from_numpy(np.fromfile(path, dtype="<f4", offset=HEADER.size).copy())
    head = dim // heads
    kv = kv_heads * head
    pos = 0

    def take(*shape: int) -> torch.Tensor:
        nonlocal pos
        n = int(np.prod(shape))
        t = data[pos:pos + n].view(*shape)
        pos += n
        return t

    emb = take(abs(vocab), dim)
    att_norm = take(layers, dim)
    wq, wk, wv = take(layers, dim, dim), take(layers, kv, dim), take(layers, kv, dim)
    wo = take(layers, dim, dim)
    ffn_norm = take(layers, dim)
    w1, w2, w3 = take(layers, hidden, dim), take(layers, dim, hidden), take(layers, hidden, dim)
    final_norm = take(dim)
    take(seq * head)  # freq_cis_real and freq_cis_imag: recomputed, never read
    state = {"embed_tokens.weight": emb, "norm.weight": final_norm}
    if vocab < 0:
        state["lm_head.weight"] = take(abs(vocab), dim)
    for i in range(layers):
        p = f"layers.{i}."
        state.update({
            p + "attention.norm.weight": att_norm[i],
            p + "attention.op.q_proj.weight": _interleaved_to_halves(wq[i], heads),
            p + "attention.op.k_proj.weight": _interleaved_to_halves(wk[i], kv_heads),
            p + "attention.op.v_proj.weight": wv[i],
            p + "attention.op.o_proj.weight": wo[i],
            p + "ffn.norm.weight": ffn_norm[i],
            p + "ffn.op.gate_proj.weight": w1[i],
            p + "ffn.op.down_proj.weight": w2[i],
            p + "ffn.op.up_proj.weight": w3[i],
        })
    state = {k: v.contiguous() for k, v in state.items()}
    return model_from_state_dict(config, state, str(path), device, dtype)
