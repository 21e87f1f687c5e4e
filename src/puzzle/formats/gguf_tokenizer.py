"""A model's tokenizer (and chat template) as GGUF metadata, the way llama.cpp's converter writes it.

Hugging Face tokenizers go through gguf-py's own vocab readers: a byte-level BPE (`tokenizer.json`) becomes
llama.cpp's `gpt2` model with its pre-tokenizer named from the `tokenizer.json` steps; a SentencePiece model or a
byte-fallback BPE becomes `llama`. llama2.c's `tokenizer.bin` (SentencePiece pieces with ' ' for U+2581) becomes
`llama` too. Special token ids, `add_bos_token` and the chat template come from gguf's `SpecialVocab`.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from puzzle.core.errors import PuzzleError
from puzzle.formats.native import copy_tokenizer_files
from puzzle.formats.tokenizers import Llama2cTokenizer

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp) named by the tokenizer.json steps that implement them.
_LLAMA3_MARKS = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)", "\\p{N}{1,3}")


def bpe_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str | None:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE, or None when the steps match none we know."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # \p{N} one by one, then GPT-2's regex
    if kinds and kinds[0] == "Split":
        pattern = json.dumps(steps[0].get("pattern"))
        if all(json.dumps(mark)[1:-1] in pattern for mark in _LLAMA3_MARKS):
            return "llama-bpe"
    return None


def add_tokenizer(writer: Any, gguf: Any, tokenizer_source: Any, vocab_size: int,
                  special_ids: dict[str, int | None] | None = None) -> str:
    """Write the tokenizer of `tokenizer_source` (a path or a loaded Tokenizer; None: none) into the GGUF metadata;
    returns what was written ('gpt2 (gpt-2)', 'llama', 'none'). `special_ids` ({'bos': 1, 'eos': 2}, from the
    model's config) fill in the ids the tokenizer files do not name."""
    if tokenizer_source is None:
        writer.add_tokenizer_model("no_vocab")
        return "none"
    with tempfile.TemporaryDirectory(prefix="puzzle-gguf-vocab-") as tmp:
        d = Path(tmp)
        names = copy_tokenizer_files(tokenizer_source, d)
        if not names:
            writer.add_tokenizer_model("no_vocab")
            return "none"
        if "tokenizer.bin" in names and not (d / "tokenizer.json").exists():
            return _llama2c(writer, gguf, Llama2cTokenizer(d / "tokenizer.bin"), vocab_size)
        kind = _hf_vocab(writer, gguf, d, vocab_size)
        special = gguf.SpecialVocab(d, load_merges=kind.startswith("gpt2"), n_vocab=vocab_size)
        for typ, token_id in (special_ids or {}).items():
            if isinstance(token_id, int) and 0 <= token_id < vocab_size:
                special.special_token_ids.setdefault(typ, token_id)
        special.add_to_gguf(writer, quiet=True)
        return kind


def _hf_vocab(writer: Any, gguf: Any, d: Path, vocab_size: int) -> str:
    vocab, kind = None, ""
    if (d / "tokenizer.model").exists():
        vocab, kind = gguf.vocab.SentencePieceVocab(d), "llama"
    else:
        for cls in (gguf.vocab.BpeVocab, gguf.vocab.LlamaHfVocab):
            try:
                vocab, kind = cls(d), cls.tokenizer_model
                break
            except (FileNotFoundError, TypeError):  # gguf's way of saying "not this kind of tokenizer"
                continue
    if vocab is None:
        raise PuzzleError(f"the tokenizer ({', '.join(sorted(p.name for p in d.iterdir()))}) is neither a byte-level "
                          "BPE nor a SentencePiece/Llama tokenizer; llama.cpp cannot read it: export without --format gguf")
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    for i in range(len(tokens), vocab_size):  # embedding rows beyond the tokenizer (padded vocabularies)
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        pre = bpe_pre_tokenizer(json.loads((d / "tokenizer.json").read_text())) if (d / "tokenizer.json").exists() \
            else "gpt-2"
        if pre is None:
            print("puzzle export: note: the tokenizer's pre-tokenizer matches none llama.cpp names here; writing "
                  "'default' (llama.cpp may split some text differently)", file=sys.stderr)
            pre = "default"
        writer.add_tokenizer_pre(pre)
        kind = f"gpt2 ({pre})"
    writer.add_token_list(tokens[:vocab_size])
    writer.add_token_scores(scores[:vocab_size])
    writer.add_token_types(types[:vocab_size])
    return kind


def _llama2c(writer: Any, gguf: Any, tok: Llama2cTokenizer, vocab_size: int) -> str:
    types = []
    for i, piece in enumerate(tok.pieces):
        if i == 0:
            types.append(gguf.TokenType.UNKNOWN)
        elif i in (tok.bos_id, tok.eos_id):
            types.append(gguf.TokenType.CONTROL)
        elif piece.startswith(b"<0x") and piece.endswith(b">") and len(piece) == 6:
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p.replace(b" ", "\u2581".encode()) for p in tok.pieces][:vocab_size])
    writer.add_token_scores(tok.scores[:vocab_size])
    writer.add_token_types(types[:vocab_size])
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)
    writer.add_unk_token_id(0)
    return "llama (llama2.c)"
