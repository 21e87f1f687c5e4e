"""One small tokenizer interface over SentencePiece, Hugging Face tokenizers and llama2.c `tok*.bin`.

`load_tokenizer(path)` takes a model directory or a tokenizer file. In a directory a SentencePiece
`tokenizer.model` is preferred: transformers' automatic fast conversion differs from SentencePiece on runs
of spaces, and SentencePiece gives the ids a Llama-2-style model was trained on.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Protocol, runtime_checkable

from puzzle.core.errors import PuzzleError
from puzzle.formats.bpe_merge import bpe_merge

HF_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)


@runtime_checkable
class Tokenizer(Protocol):
    bos_id: int | None
    eos_id: int | None

    @property
    def vocab_size(self) -> int: ...

    @property
    def files(self) -> list[Path]:
        """Files to copy next to an exported model so that the same tokenizer loads from there."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS or EOS."""
        ...

    def decode(self, ids: list[int]) -> str: ...


class SentencePieceTokenizer:
    def __init__(self, path: str | Path) -> None:
        import sentencepiece as spm  # lazy: only SentencePiece models need it

        self.path = Path(path)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise PuzzleError(f"{self.path} is not a SentencePiece model ({e}); re-download it") from None
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def files(self) -> list[Path]:
        siblings = [self.path.parent / n for n in ("tokenizer_config.json", "special_tokens_map.json")]
        return [self.path] + [p for p in siblings if p.exists()]

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


class HFTokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        from transformers import AutoTokenizer  # lazy: transformers takes seconds to import

        self.dir = Path(model_dir)
        try:
            # Never run a model's remote code for its tokenizer: with trust_remote_code unset, transformers asks on
            # stdin (and waits) when config.json maps remote classes, as a Nemotron-NAS export does.
            self.tok = AutoTokenizer.from_pretrained(str(self.dir), trust_remote_code=False,
                                                     **_config_override(self.dir))
        except (OSError, ValueError) as e:
            raise PuzzleError(f"cannot load the tokenizer in {self.dir} ({e}); check its tokenizer files") from None
        self.bos_id = self.tok.bos_token_id
        self.eos_id = self.tok.eos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    @property
    def files(self) -> list[Path]:
        return [self.dir / n for n in HF_TOKENIZER_FILES if (self.dir / n).exists()]

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([int(i) for i in ids])


# ---- llama2.c's tokenizer -------------------------------------------------------------------------------------------

_BYTE_PIECE = re.compile(rb"^<0x([0-9A-Fa-f]{2})>$")


class Llama2cTokenizer:
    """llama2.c's tokenizer: encode = its greedy BPE merge by score; decode = what its `run` prints."""

    bos_id = 1
    eos_id = 2

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        raw = self.path.read_bytes()
        if len(raw) < 4:
            raise PuzzleError(f"{self.path} is not a llama2.c tokenizer (too short); re-download it")
        pos = 4  # max_token_length, unused
        self.pieces: list[bytes] = []
        self.scores: list[float] = []
        while pos < len(raw):
            if pos + 8 > len(raw):
                raise PuzzleError(f"{self.path} is truncated; re-download the llama2.c tokenizer")
            score, length = struct.unpack_from("<fi", raw, pos)
            pos += 8
            if length < 0 or pos + length > len(raw):
                raise PuzzleError(f"{self.path} is truncated or not a llama2.c tokenizer; re-download it")
            self.pieces.append(raw[pos:pos + length])
            self.scores.append(score)
            pos += length
        self.lookup = {p: i for i, p in enumerate(self.pieces)}  # first id wins, as llama2.c's bsearch mostly does

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    @property
    def files(self) -> list[Path]:
        return [self.path]

    def encode(self, text: str) -> list[int]:
        """No BOS/EOS; a dummy prefix space as sentencepiece adds (llama2.c's add_dummy_prefix)."""
        if not text:
            return []
        ids = [self.lookup[b" "]]
        for ch in text:
            b = ch.encode("utf-8")
            if b in self.lookup:
                ids.append(self.lookup[b])
            else:  # byte fallback: the first 3 ids are <unk>, <s>, </s>
                ids.extend(byte + 3 for byte in b)
        return bpe_merge(ids, self._pair_merge)  # the best-scoring adjacent pair first, leftmost on ties

    def _pair_merge(self, a: int, b: int) -> tuple[int, float] | None:
        merged = self.lookup.get(self.pieces[a] + self.pieces[b])
        return None if merged is None else (merged, self.scores[merged])

    def piece_bytes(self, token: int, prev: int | None) -> bytes:
        piece = self.pieces[token]
        if prev == self.bos_id and piece.startswith(b" "):
            piece = piece[1:]
        m = _BYTE_PIECE.match(piece)
        if m:
            piece = bytes([int(m.group(1), 16)])
        if len(piece) == 1 and (piece[0] < 0x20 and not chr(piece[0]).isspace() or piece[0] == 0x7F):
            return b""  # llama2.c's safe_printf drops lone control bytes (high bytes are kept: UTF-8)
        return piece

    def decode(self, ids: list[int]) -> str:
        out, prev = [], None
        for token in ids:
            token = int(token)
            if token not in (self.bos_id, self.eos_id):
                # At the very start, act as if BOS preceded (sentencepiece drops the leading space too).
                out.append(self.piece_bytes(token, self.bos_id if prev is None else prev))
            prev = token
        return b"".join(out).decode("utf-8", errors="replace")


def _config_override(model_dir: Path) -> dict[str, object]:
    """`config=` for AutoTokenizer when config.json names remote code or is this package's native config: a blank
    config, so that transformers neither imports that code nor reads fields it would warn about (a native
    config's `rope_scaling`); the class comes from tokenizer_config.json."""
    from transformers import PretrainedConfig  # lazy: transformers takes seconds to import

    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    ours = isinstance(config, dict) and ("auto_map" in config or "puzzle_format" in config)  # native.FORMAT_KEY
    return {"config": PretrainedConfig()} if ours else {}


def _llama2c_tokenizer_beside(path: Path) -> Path | None:
    folder = path if path.is_dir() else path.parent
    candidates = sorted(folder.glob("tok*.bin"))
    return candidates[0] if candidates else None


def has_tokenizer(model_dir: str | Path) -> bool:
    """Whether `load_tokenizer(model_dir)` would find a tokenizer file in this directory."""
    d = Path(model_dir)
    if d.is_file() and d.suffix == ".gguf":
        from puzzle.formats.gguf import gguf_has_tokenizer  # lazy: gguf.py builds on this module

        return gguf_has_tokenizer(d)
    names = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")
    return any((d / n).exists() for n in names) or _llama2c_tokenizer_beside(d) is not None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A model directory, a llama2.c `.bin` (its `tok*.bin` beside it), or a tokenizer file."""
    path = Path(path)
    if not path.exists():
        raise PuzzleError(f"tokenizer path {path} does not exist; pass a model directory or a tokenizer file")
    if path.is_dir():
        if (path / "tokenizer.model").exists():
            return SentencePieceTokenizer(path / "tokenizer.model")
        # Before tokenizer.json: an exported llama2.c model carries both, the json converted from the tok*.bin.
        tok = _llama2c_tokenizer_beside(path)
        if tok is not None:
            return Llama2cTokenizer(tok)
        if (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists():
            return HFTokenizer(path)
        raise PuzzleError(
            f"no tokenizer in {path} (looked for tokenizer.model, tokenizer.json, tok*.bin); add one or pass "
            "the tokenizer file"
        )
    name = path.name
    if name.endswith(".gguf"):  # llama.cpp: the tokenizer sits in the file's metadata
        from puzzle.formats.gguf import GGUFTokenizer  # lazy: gguf.py builds on this module

        return GGUFTokenizer(path)
    if name.endswith(".model"):
        return SentencePieceTokenizer(path)
    if name in ("tokenizer.json", "tokenizer_config.json"):
        return HFTokenizer(path.parent)
    if name.startswith("tok") and name.endswith(".bin"):
        return Llama2cTokenizer(path)
    if name.endswith(".bin"):  # a llama2.c model: its tokenizer lies beside it
        tok = _llama2c_tokenizer_beside(path)
        if tok is not None:
            return Llama2cTokenizer(tok)
    if name == "config.json":
        return load_tokenizer(path.parent)
    raise PuzzleError(
        f"{path} is not a tokenizer this package reads; use a SentencePiece .model, tokenizer.json, or tok*.bin"
    )
