"""llama2.c interop: the real stories260K reproduces the reference greedy text byte for byte."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

from puzzle.formats import detect_format, load_model, load_model_config
from puzzle.formats.tokenizers import Llama2cTokenizer, load_tokenizer

STORIES = Path(__file__).resolve().parents[1] / ".." / "shared" / "models" / "stories260K"
needs_stories = pytest.mark.skipif(not (STORIES / "stories260K.bin").exists(),
                                   reason="../shared/models/stories260K is absent (real llama2.c checkpoint)")


def _greedy(model: torch.nn.Module, steps: int) -> list[int]:
    """llama2.c's loop: start from BOS (1); stop early if BOS comes out again; full recompute each step."""
    ids = [1]
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == 1:
                break
            ids.append(nxt)
    return ids


@needs_stories
def test_stories260k_greedy_matches_reference_bytes() -> None:
    path = STORIES / "stories260K.bin"
    assert detect_format(path) == "llama2c" and detect_format(STORIES) == "llama2c"
    model = load_model(path)
    config = model.config
    assert (config.hidden_size, config.num_layers, config.num_attention_heads, config.vocab_size) == (64, 5, 8, 512)
    assert config.blocks[0].attention.num_kv_heads == 4 and config.blocks[0].ffn.intermediate_size == 172
    assert config.tie_word_embeddings and load_model_config(path) == config
    tokenizer = load_tokenizer(path)
    text = tokenizer.decode(_greedy(model, 200)) + "\n"  # llama2.c prints a newline at the end
    assert text.encode("utf-8") == (STORIES / "expected_greedy_200.txt").read_bytes()


@needs_stories
def test_stories_tokenizer_round_trip() -> None:
    tok = load_tokenizer(STORIES / "tok512.bin")
    assert isinstance(tok, Llama2cTokenizer) and tok.vocab_size == 512 and (tok.bos_id, tok.eos_id) == (1, 2)
    text = "Once upon a time, Lily saw a big red ball."
    ids = tok.encode(text)
    assert len(ids) < len(text) / 2  # merged, not per character
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode("é")) == "é"  # byte fallback <0xNN> pieces


def _write_tokenizer(path: Path, pieces: list[tuple[bytes, float]]) -> None:
    data = struct.pack("<i", max(len(p) for p, _ in pieces))
    for piece, score in pieces:
        data += struct.pack("<fi", score, len(piece)) + piece
    path.write_bytes(data)


def test_bpe_merges_by_score(tmp_path: Path) -> None:
    pieces = [(b"<unk>", 0.0), (b"\n<s>\n", 0.0), (b"\n</s>\n", 0.0)]
    pieces += [(f"<0x{b:02X}>".encode(), 0.0) for b in range(256)]
    pieces += [(b" ", -1.0), (b"a", -1.0), (b"b", -1.0), (b"ab", -5.0), (b" a", -2.0), (b" ab", -3.0)]
    _write_tokenizer(tmp_path / "tok.bin", pieces)
    tok = Llama2cTokenizer(tmp_path / "tok.bin")
    ids = {p: i for i, (p, _) in enumerate(pieces)}
    # " a" (score -2) merges before "ab" (-5); then " a"+"b" -> " ab".
    assert tok.encode("ab") == [ids[b" ab"]]
    assert tok.encode("ba") == [ids[b" "], ids[b"b"], ids[b"a"]]
    assert tok.decode([1, ids[b" ab"]]) == "ab" and tok.decode([ids[b"<0x41>"]]) == "A"
