"""llama2.c's BPE encode: the heap merge gives the reference quadratic loop's ids, in linear-ish time."""

from __future__ import annotations

import random
import struct
import time
from pathlib import Path

import pytest

from puzzle.formats.tokenizers import Llama2cTokenizer

STORIES = Path(__file__).resolve().parents[1] / ".." / "shared" / "models" / "stories260K"


def _reference_encode(tok: Llama2cTokenizer, text: str) -> list[int]:
    """llama2.c's own loop: rescan all pairs, merge the best (leftmost on ties), until none merges."""
    if not text:
        return []
    ids = [tok.lookup[b" "]]
    for ch in text:
        b = ch.encode("utf-8")
        ids.extend([tok.lookup[b]] if b in tok.lookup else [byte + 3 for byte in b])
    while True:
        best, best_id, best_i = -1e10, -1, -1
        for i in range(len(ids) - 1):
            merged = tok.lookup.get(tok.pieces[ids[i]] + tok.pieces[ids[i + 1]])
            if merged is not None and tok.scores[merged] > best:
                best, best_id, best_i = tok.scores[merged], merged, i
        if best_i < 0:
            return ids
        ids[best_i:best_i + 2] = [best_id]


def _tied_tokenizer(path: Path) -> Llama2cTokenizer:
    """A vocab with many equal scores, so that the leftmost-on-ties rule decides most merges."""
    pieces = [(b"<unk>", 0.0), (b"<s>", 0.0), (b"</s>", 0.0)] + [(f"<0x{i:02X}>".encode(), 0.0) for i in range(256)]
    pieces += [(c.encode(), 0.0) for c in " abc"]
    pieces += [(p.encode(), s) for p, s in [("aa", -1.0), ("ab", -1.0), ("ba", -1.0), ("aaa", -1.0), ("bab", -2.0),
                                            (" a", -1.0), ("abc", -1.0), ("cc", -3.0), ("aab", -1.0), ("ccc", -1.0)]]
    with path.open("wb") as f:
        f.write(struct.pack("<i", 8))
        for piece, score in pieces:
            f.write(struct.pack("<fi", score, len(piece)) + piece)
    return Llama2cTokenizer(path)


def test_heap_merge_equals_reference_on_ties(tmp_path: Path) -> None:
    tok = _tied_tokenizer(tmp_path / "tok.bin")
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("abc é") for _ in range(rng.randint(0, 40)))
        assert tok.encode(text) == _reference_encode(tok, text), text


@pytest.mark.skipif(not (STORIES / "tok512.bin").exists(), reason="../shared/models/stories260K is absent")
def test_stories_encode_equals_reference_and_is_fast() -> None:
    tok = Llama2cTokenizer(STORIES / "tok512.bin")
    rng = random.Random(1)
    alphabet = "abcdefghijklmnopqrstuvwxyz     ,.!?\n'ABCTéü中"
    words = ["Once", "upon", "a", "time", "there", "was", "little", "girl", "named", "Lily", "she", "liked"]
    for _ in range(25):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
        text += " ".join(rng.choice(words) for _ in range(rng.randint(0, 40)))
        assert tok.encode(text) == _reference_encode(tok, text)
    big = " ".join(rng.choice(words) for _ in range(200_000))[:1_000_000]  # 1 MB
    start = time.process_time()  # CPU time: other processes on a busy machine do not count
    ids = tok.encode(big)
    assert time.process_time() - start < 20  # ~3 s here; the quadratic loop needs hours
    assert tok.decode(ids) == big
