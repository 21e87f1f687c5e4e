"""Tiny Llama GGUF files written the way llama.cpp's converter writes them, for tests/test_gguf.py."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 256, 4, 2, 256, 2  # 256: the K-quants' block size along a row
HEAD_DIM = HIDDEN // HEADS
# gguf 0.19's quantize implements these; for the K-quants it raises NotImplementedError.
QUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
# K-quant blocks (256 values): bytes per block, then (byte offset, value) of each fp16 super-block scale: d,
# and for the types with a min, dmin = d * the mean quant (so that values centre on zero); weights stay < ~1.
K_QUANTS = {"Q2_K": (84, ((80, 1e-2), (82, 1.5e-2))), "Q3_K": (110, ((108, 2e-3),)),
            "Q4_K": (144, ((0, 1e-3), (2, 7.5e-3))), "Q5_K": (176, ((0, 5e-4), (2, 7.75e-3))),
            "Q6_K": (210, ((208, 1e-4),))}


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte -> printable character map (bytes_to_unicode), in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i s"]
TOKENS = ["<|endoftext|>"] + _byte_level_alphabet() + [m.replace(" ", "") for m in MERGES]
VOCAB = len(TOKENS)


def _llama_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's q/k row permutation: per head, halves -> interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _k_quant_bytes(rng: np.random.Generator, rows: int, cols: int, kind: str) -> np.ndarray:
    """Random K-quant blocks with small finite fp16 scales (gguf cannot quantize to K-quants)."""
    size, scales = K_QUANTS[kind]
    blocks = rng.integers(0, 256, size=(rows, cols // 256, size), dtype=np.uint8)
    for off, value in scales:
        blocks[:, :, off:off + 2] = np.frombuffer(np.float16(value).tobytes(), dtype=np.uint8)
    return blocks.reshape(rows, -1)


def _add(writer: gguf.GGUFWriter, name: str, w: np.ndarray, kind: str, rng: np.random.Generator) -> None:
    if w.ndim == 1 or kind == "F32":
        writer.add_tensor(name, w.astype(np.float32))
    elif kind in K_QUANTS:
        writer.add_tensor(name, _k_quant_bytes(rng, *w.shape, kind), raw_dtype=Q[kind])
    elif kind == "IQ4_NL":  # a type the importer does not read: 32 values in 18 bytes
        writer.add_tensor(name, np.zeros((w.shape[0], w.shape[1] // 32 * 18), np.uint8), raw_dtype=Q.IQ4_NL)
    else:
        q = gguf.quants.quantize(w.astype(np.float32), Q[kind])
        writer.add_tensor(name, q, raw_dtype=Q[kind])


def write_tiny_llama(path: Path, kind: str = "F32", tied: bool = True, arch: str = "llama", seed: int = 0) -> Path:
    """A 2-layer Llama GGUF with a GPT-2-style BPE vocabulary in its metadata; matrices stored as `kind`."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(100000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] + [1] * (VOCAB - 1))  # 3: control, 1: normal
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.08).astype(np.float32)

    _add(writer, "token_embd.weight", mat(VOCAB, HIDDEN), kind, rng)
    _add(writer, "output_norm.weight", 1 + 0.1 * rng.standard_normal(HIDDEN), kind, rng)
    if not tied:
        _add(writer, "output.weight", mat(VOCAB, HIDDEN), kind, rng)
    for i in range(LAYERS):
        p = f"blk.{i}."
        _add(writer, p + "attn_norm.weight", 1 + 0.1 * rng.standard_normal(HIDDEN), kind, rng)
        _add(writer, p + "attn_q.weight", _llama_permute(mat(HIDDEN, HIDDEN), HEADS), kind, rng)
        _add(writer, p + "attn_k.weight", _llama_permute(mat(KV_HEADS * HEAD_DIM, HIDDEN), KV_HEADS), kind, rng)
        _add(writer, p + "attn_v.weight", mat(KV_HEADS * HEAD_DIM, HIDDEN), kind, rng)
        _add(writer, p + "attn_output.weight", mat(HIDDEN, HIDDEN), kind, rng)
        _add(writer, p + "ffn_norm.weight", 1 + 0.1 * rng.standard_normal(HIDDEN), kind, rng)
        _add(writer, p + "ffn_gate.weight", mat(FFN, HIDDEN), kind, rng)
        _add(writer, p + "ffn_up.weight", mat(FFN, HIDDEN), kind, rng)
        _add(writer, p + "ffn_down.weight", mat(HIDDEN, FFN), kind, rng)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
