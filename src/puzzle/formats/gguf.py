"""GGUF files (llama.cpp's format) of the Llama architecture: config, weights and tokenizer.

Read with the `gguf` package (llama.cpp's own reader, an optional extra: `pip install gguf`); quantized tensors
are dequantized to float32 by `gguf.quants.dequantize`. llama.cpp's converter permutes the q/k rows of each head
for its interleaved RoPE; they are permuted back as transformers' GGUF loader does. The tokenizer (and chat
template) in the file's metadata is converted by transformers and saved as ordinary Hugging Face tokenizer files,
so an imported parent and its children load with AutoTokenizer and need no gguf.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from puzzle.core.errors import PuzzleError
from puzzle.formats.tokenizers import HFTokenizer
from puzzle.formats.weights import model_from_state_dict
from puzzle.model.blocks import ModelConfig, uniform_blocks
from puzzle.model.decoder import PuzzleModel

MAGIC = b"GGUF"
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# The one table of tensor names, GGUF stem -> ours (`.weight` / `.bias` carried over); the export inverts it.
TOP_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_norm": "attention.norm", "attn_q": "attention.op.q_proj", "attn_k": "attention.op.k_proj",
    "attn_v": "attention.op.v_proj", "attn_output": "attention.op.o_proj", "ffn_norm": "ffn.norm",
    "ffn_gate": "ffn.op.gate_proj", "ffn_down": "ffn.op.down_proj", "ffn_up": "ffn.op.up_proj",
}
_REQUIRED = object()


def looks_like_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def _gguf() -> Any:
    try:
        import gguf  # lazy: an optional extra
    except ImportError:
        raise PuzzleError("reading .gguf files needs the gguf package; run `pip install gguf` "
                          "(or `pip install 'puzzle-llm[gguf]'`)") from None
    return gguf


def open_gguf(path: str | Path) -> Any:
    """A `gguf.GGUFReader` over the file (memory-mapped: tensors are read when touched)."""
    path = Path(path)
    gguf = _gguf()
    try:
        return gguf.GGUFReader(path)
    # The reader raises assorted types (ValueError, IndexError, KeyError, struct errors) on a malformed file.
    except Exception as e:  # noqa: BLE001
        raise PuzzleError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it may be truncated "
                          "or corrupt: re-download it") from None


def _field(reader: Any, path: Path, key: str, default: Any = _REQUIRED) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise PuzzleError(f"{path}: GGUF metadata lacks {key}; the file is incomplete: re-convert it")
        return default
    return field.contents()


def tensor_types(reader: Any) -> dict[str, int]:
    """GGUF tensor type name -> number of tensors of that type, e.g. {'Q4_1': 210, 'F32': 61}."""
    return dict(Counter(t.tensor_type.name for t in reader.tensors))


def gguf_summary(reader: Any, path: str | Path) -> dict[str, Any]:
    """For `puzzle inspect`: the file's architecture and its tensor types with their counts (from the reader
    the config was read from: the file is parsed once)."""
    return {"gguf_architecture": _field(reader, Path(path), "general.architecture"),
            "gguf_tensor_types": tensor_types(reader)}


def _check(reader: Any, path: Path) -> None:
    arch = _field(reader, path, "general.architecture")
    if arch != "llama":
        raise PuzzleError(f"{path}: GGUF architecture {arch!r} is not supported; only 'llama' (Llama-family) "
                          "files can be imported")
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise PuzzleError(f"{path}: tensor {t.name} has GGUF type {t.tensor_type.name}, which is not "
                              f"supported (supported: {', '.join(SUPPORTED_TYPES)}); re-quantize the file to one")
        if t.name == "rope_freqs.weight" or t.name.endswith(".bias"):
            raise PuzzleError(f"{path}: tensor {t.name} (RoPE scaling or q/k/v bias) is not supported in GGUF "
                              "import; convert the model to a Hugging Face directory and import that")


def _int(reader: Any, path: Path, key: str, default: Any = _REQUIRED) -> Any:
    """A scalar integer field (per-layer arrays, as some non-Llama files hold, are not read)."""
    value = _field(reader, path, key, default)
    if value is not None and (isinstance(value, (list, str)) or int(value) != value):
        raise PuzzleError(f"{path}: GGUF field {key} is {value!r}, not one integer; per-layer shapes are not "
                          "supported in GGUF import")
    return None if value is None else int(value)


def _token_id(reader: Any, path: Path, key: str, default: int | None) -> int | None:
    return _int(reader, path, f"tokenizer.ggml.{key}", default)


def config_from_reader(reader: Any, path: Path) -> ModelConfig:
    _check(reader, path)
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise PuzzleError(f"{path}: no token_embd.weight tensor; the file is incomplete: re-convert it")
    hidden = _int(reader, path, "llama.embedding_length")
    heads = _int(reader, path, "llama.attention.head_count")
    kv_heads = _int(reader, path, "llama.attention.head_count_kv", heads)
    head_dim = _int(reader, path, "llama.attention.key_length", None) or _int(
        reader, path, "llama.rope.dimension_count", None) or hidden // heads
    scaling = _field(reader, path, "llama.rope.scaling.type", "none")
    if scaling != "none":
        raise PuzzleError(f"{path}: GGUF rope scaling {scaling!r} is not supported; convert the model to a "
                          "Hugging Face directory and import that")
    return ModelConfig(
        vocab_size=int(names["token_embd.weight"].shape[1]),  # ggml shape: [hidden, vocab]
        hidden_size=hidden, num_attention_heads=heads, head_dim=head_dim,
        blocks=uniform_blocks(_int(reader, path, "llama.block_count"), kv_heads,
                              _int(reader, path, "llama.feed_forward_length")),
        max_position_embeddings=_int(reader, path, "llama.context_length", 2048),
        rms_norm_eps=float(_field(reader, path, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, path, "llama.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in names,  # llama.cpp drops the classifier when it is tied
        bos_token_id=_token_id(reader, path, "bos_token_id", 1),
        eos_token_id=_token_id(reader, path, "eos_token_id", 2),
        pad_token_id=_token_id(reader, path, "padding_token_id", None),
        source_architecture="LlamaForCausalLM",
    )


def load_gguf_config(path: str | Path) -> ModelConfig:
    return config_from_reader(open_gguf(path), Path(path))


def _halves_from_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation: rows [n_heads*D, in], per head (2i, 2i+1) -> (i, i + D/2)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _dequantize(gguf: Any, t: Any, path: Path) -> torch.Tensor:
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # ggml lists the innermost dimension first
    try:
        if t.tensor_type.name in ("F32", "F16"):
            arr = np.array(t.data, dtype=np.float32)  # a copy: t.data is a read-only view of the mapped file
        else:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32).reshape(shape))
    except ValueError as e:
        raise PuzzleError(f"{path}: tensor {t.name} cannot be read ({e}); the file is truncated or corrupt: "
                          "re-download it") from None


def _our_key(name: str) -> str:
    """GGUF tensor name -> our key; names we do not know pass through (the loader then reports them)."""
    stem, _, suffix = name.rpartition(".")
    if stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_NAMES:
        return f"layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{suffix}"
    return name


def state_dict_from_reader(reader: Any, config: ModelConfig, path: Path,
                           dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our keys -> dequantized tensors, float32 or `dtype` (cast per tensor: no whole float32 copy is held)."""
    gguf = _gguf()

    def read(t: Any) -> torch.Tensor:
        w = _dequantize(gguf, t, path)
        return w if dtype is None else w.to(dtype)

    # numpy releases the GIL in the large array operations of dequantize: a thread per core overlaps tensors.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        tensors = list(pool.map(read, reader.tensors))
    state = {}
    for t, w in zip(reader.tensors, tensors):
        key = _our_key(t.name)
        if key.endswith("q_proj.weight"):
            w = _halves_from_interleaved(w, config.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            w = _halves_from_interleaved(w, config.blocks[int(key.split(".")[1])].attention.num_kv_heads)
        state[key] = w
    return state


def load_gguf(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> PuzzleModel:
    """The file as a PuzzleModel; weights dequantized to float32 (or `dtype`)."""
    path = Path(path)
    reader = open_gguf(path)
    config = config_from_reader(reader, path)
    state = state_dict_from_reader(reader, config, path, dtype)
    return model_from_state_dict(config, state, str(path), device, dtype)


def gguf_has_tokenizer(path: str | Path) -> bool:
    return "tokenizer.ggml.model" in open_gguf(path).fields


class GGUFTokenizer(HFTokenizer):
    """The file's tokenizer as transformers converts it, saved as Hugging Face files in a temporary directory
    (kept while this object lives) so that `files` can be copied beside an imported model."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer  # lazy: transformers takes seconds to import

        path = Path(path)
        _gguf()
        self._tmp = tempfile.TemporaryDirectory(prefix="puzzle-gguf-tokenizer-")
        try:
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except (OSError, ValueError, KeyError) as e:
            raise PuzzleError(f"cannot convert the tokenizer in {path} ({e}); check its tokenizer.ggml.* "
                              "metadata") from None
        tok.save_pretrained(self._tmp.name)
        super().__init__(self._tmp.name)
