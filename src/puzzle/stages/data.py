"""The `data` stage: tokenize local text with the parent's tokenizer, pack fixed-length sequences, split.

Sources are files or folders of .txt (also .txt.xz / .bz2 / .gz), .jsonl (a named text field) and .parquet
(a named column). A document is one .txt file (or one paragraph/line, see `txt_documents`) or one
jsonl/parquet record. Each document gets BOS (when the tokenizer has one) and EOS, and goes whole to train,
valid or test by a seeded hash of its content (`document_split`): where the corpus lives or how its path was
typed does not change the split, and duplicated documents never straddle two splits. Tokens stream into
`train.bin` / `valid.bin` / `test.bin` (uint16 when the vocabulary fits, else uint32); the corpus is never held
in memory. `load_tokens` maps them as [N, seq_len].

Who reads what: BLD, scoring and uptraining read train and valid; only `eval` reads test, so the numbers it
reports come from documents that chose no block and tuned no weight.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, Protocol

import numpy as np
from tqdm import tqdm

from puzzle.core.artifacts import (
    STAMP,
    atomic_dir,
    hash_file,
    hash_json,
    hash_paths,
    read_json,
    stage_is_current,
    write_json,
)
from puzzle.core.config import to_dict
from puzzle.core.errors import PuzzleError
from puzzle.core.rundir import RunDir
from puzzle.formats import load_model_config
from puzzle.formats.tokenizers import load_tokenizer

SPLITS = ("train", "valid", "test")
_OPENERS = {".xz": lzma.open, ".bz2": bz2.open, ".gz": gzip.open}
_TEXT_SUFFIXES = (".txt", ".text", ".md", ".raw")


class Tokenizer(Protocol):
    bos_id: int | None
    eos_id: int | None
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...


@dataclass
class DataConfig:
    sources: list[str] = field(default_factory=list)  # files or folders
    seq_len: int = 256
    valid_fraction: float = 0.05  # documents for BLD / scoring / uptrain validation
    test_fraction: float = 0.05  # documents only `eval` reads
    seed: int = 0
    max_tokens: int | None = None  # stop reading once this many tokens are written (None = all)
    text_field: str = "text"  # jsonl field / parquet column
    txt_documents: Literal["file", "paragraphs", "lines"] = "file"  # what counts as one .txt document
    add_bos: bool = True
    add_eos: bool = True
    chunk_chars: int = 1 << 20  # .txt files are tokenized this many characters at a time (at line ends)

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise PuzzleError(f"data.seq_len must be at least 2, got {self.seq_len}")
        for name in ("valid_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise PuzzleError(f"data.{name} must be in (0, 1), got {value}")
        if self.valid_fraction + self.test_fraction >= 1.0:
            raise PuzzleError(f"data.valid_fraction + data.test_fraction must be below 1 (train needs the rest), "
                              f"got {self.valid_fraction} + {self.test_fraction}")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise PuzzleError(f"data.max_tokens must be positive (or unset for all), got {self.max_tokens}")
        if self.chunk_chars <= 0:
            raise PuzzleError(f"data.chunk_chars must be positive, got {self.chunk_chars}")
        if not self.text_field:
            raise PuzzleError("data.text_field is empty; name the jsonl field / parquet column, e.g. text")


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    for comp in _OPENERS:
        name = name.removesuffix(comp)
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(_TEXT_SUFFIXES):
        return "txt"
    return None


def source_files(sources: list[str]) -> list[Path]:
    """Every readable file named by the sources (folders recursively), in a stable order."""
    if not sources:
        raise PuzzleError("data.sources is empty; name text files or folders, e.g. data.sources=[corpus/]")
    files: list[Path] = []
    for s in sources:
        p = Path(s)
        if not p.exists():
            raise PuzzleError(f"data source {p} does not exist; fix data.sources")
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and _kind(q) is not None)
            if not found:
                raise PuzzleError(f"data source folder {p} holds no .txt, .jsonl or .parquet files")
            files += found
        elif _kind(p) is None:
            raise PuzzleError(f"data source {p}: unsupported file type; use .txt, .jsonl or .parquet "
                              "(optionally .xz/.bz2/.gz compressed)")
        else:
            files.append(p)
    return list(dict.fromkeys(files))


def _open_text(path: Path) -> IO[str]:
    opener = _OPENERS.get(path.suffix.lower())
    if opener is not None:
        return opener(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace", newline=None)


def text_key(text: str) -> str:
    """The split key of a one-piece document: its content, so identical documents share a split."""
    return "sha256:" + hashlib.sha256(text.encode("utf-8", errors="replace")).hexdigest()


def _txt_documents(path: Path, mode: str, chunk_chars: int, file_key: str) -> Iterator[tuple[str, Iterator[str]]]:
    """(split key, text pieces) for a text file; pieces end at line boundaries. A whole-file document is keyed by
    the file's hash (`file_key`, computed once for the manifest), a paragraph or line by its text."""
    if mode == "file":
        def pieces() -> Iterator[str]:
            with _open_text(path) as f:
                buf: list[str] = []
                size = 0
                for line in f:
                    buf.append(line)
                    size += len(line)
                    if size >= chunk_chars:
                        yield "".join(buf)
                        buf, size = [], 0
                if buf:
                    yield "".join(buf)
        yield file_key, pieces()
        return
    with _open_text(path) as f:
        buf = []
        for line in f:
            if mode == "lines":
                if line.strip():
                    text = line.rstrip("\n")
                    yield text_key(text), iter([text])
                continue
            if line.strip():
                buf.append(line)
            elif buf:
                text = "".join(buf).rstrip("\n")
                yield text_key(text), iter([text])
                buf = []
        if buf:
            text = "".join(buf).rstrip("\n")
            yield text_key(text), iter([text])


def _jsonl_documents(path: Path, field_name: str) -> Iterator[tuple[str, Iterator[str]]]:
    with _open_text(path) as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise PuzzleError(f"{path} line {n + 1} is not valid JSON; fix or remove it") from None
            if not isinstance(record, dict) or not isinstance(record.get(field_name), str):
                raise PuzzleError(f"{path} line {n + 1} has no string field {field_name!r}; set data.text_field")
            yield text_key(record[field_name]), iter([record[field_name]])


def _parquet_documents(path: Path, column: str) -> Iterator[tuple[str, Iterator[str]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PuzzleError("reading .parquet needs pyarrow: pip install 'puzzle-llm[parquet]'") from None
    pf = pq.ParquetFile(path)
    if column not in pf.schema_arrow.names:
        raise PuzzleError(f"{path} has no column {column!r} (it has {pf.schema_arrow.names}); set data.text_field")
    for batch in pf.iter_batches(columns=[column], batch_size=1024):  # streams row groups
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text_key(str(text)), iter([str(text)])


def documents(path: Path, cfg: DataConfig, file_key: str) -> Iterator[tuple[str, Iterator[str]]]:
    """(split key, text pieces) of every document in one source file; `file_key` is the file's content hash."""
    kind = _kind(path)
    if kind == "jsonl":
        return _jsonl_documents(path, cfg.text_field)
    if kind == "parquet":
        return _parquet_documents(path, cfg.text_field)
    return _txt_documents(path, cfg.txt_documents, cfg.chunk_chars, file_key)


def document_split(key: str, seed: int, valid_fraction: float, test_fraction: float) -> str:
    """Deterministic split of one document: a seeded hash of its key, uniform in [0, 1), cut at
    [0, valid) -> valid, [valid, valid + test) -> test, the rest -> train. Raising test_fraction moves documents
    from train to test only; the valid split of a given valid_fraction stays the same."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "little") / 2**64
    if u < valid_fraction:
        return "valid"
    return "test" if u < valid_fraction + test_fraction else "train"


class _Packer:
    """Streams token ids to a binary file; whole sequences of seq_len are kept, the last partial one dropped."""

    def __init__(self, path: Path, seq_len: int, dtype: np.dtype) -> None:
        self.f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.seq_len, self.dtype = seq_len, dtype
        self.pending: list[int] = []
        self.sequences = 0
        self.tokens = 0  # all tokens seen, including the dropped tail
        self.documents = 0

    def add(self, ids: list[int]) -> None:
        self.tokens += len(ids)
        self.pending.extend(ids)
        full = len(self.pending) // self.seq_len * self.seq_len
        if full:
            np.asarray(self.pending[:full], dtype=self.dtype).tofile(self.f)
            self.sequences += full // self.seq_len
            del self.pending[:full]

    def close(self) -> None:
        self.f.close()


def _parent_vocab(run: RunDir) -> int | None:
    return load_model_config(run.parent).vocab_size if run.parent.exists() else None


def run_data(run_dir: str | Path | RunDir, cfg: DataConfig, tokenizer_path: str | Path | None = None,
             tokenizer: Tokenizer | None = None) -> Path:
    """Tokenize, pack and split the sources into `run_dir/data`; does nothing when already current."""
    run = RunDir(run_dir)
    out = run.data
    files = source_files(cfg.sources)
    tokenizer_path = Path(tokenizer_path) if tokenizer_path is not None else run.parent
    if tokenizer is None:
        if not tokenizer_path.exists():
            raise PuzzleError(f"tokenizer {tokenizer_path} does not exist; import the parent or pass --tokenizer")
        tokenizer = load_tokenizer(tokenizer_path)
    sources = [{"path": str(f), "sha256": hash_file(f), "bytes": f.stat().st_size} for f in files]
    file_keys = {str(f): "sha256:" + src["sha256"] for f, src in zip(files, sources)}
    tok_id = {"path": str(tokenizer_path), "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
              "eos_id": tokenizer.eos_id, "class": type(tokenizer).__name__,
              # the files' contents: a retrained tokenizer of the same size must not reuse the old tokens
              "files_sha256": hash_paths(list(getattr(tokenizer, "files", [])))}
    # Source paths are in the manifest but not the hash: the same files typed another way are the same data.
    inputs_hash = hash_json({"cfg": {**to_dict(cfg), "sources": None}, "split_keys": "content",
                             "sources": [{k: v for k, v in s.items() if k != "path"} for s in sources],
                             # the tokenizer's contents, not where it sits: a moved run directory stays current
                             "tokenizer": {k: v for k, v in tok_id.items() if k != "path"}})
    if stage_is_current(out, inputs_hash):
        print(f"data: {out} is current, nothing to do")
        return out
    vocab = _parent_vocab(run)
    if vocab is not None and tokenizer.vocab_size > vocab:
        raise PuzzleError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the parent's vocabulary is {vocab}; "
            "use the parent's own tokenizer (data --tokenizer PATH)"
        )
    limit = vocab or tokenizer.vocab_size
    dtype = np.dtype(np.uint16 if limit <= 65536 else np.uint32)
    with atomic_dir(out) as tmp:
        packers = {s: _Packer(tmp / RunDir.split_file(s), cfg.seq_len, dtype) for s in SPLITS}
        try:
            _tokenize(files, file_keys, cfg, tokenizer, packers, limit)
        finally:
            for p in packers.values():
                p.close()
        counts = {s: {"sequences": p.sequences, "tokens": p.tokens, "documents": p.documents,
                      "tokens_packed": p.sequences * cfg.seq_len} for s, p in packers.items()}
        for s in SPLITS:
            if counts[s]["sequences"] == 0:
                share = ("lower data.valid_fraction / data.test_fraction" if s == "train"
                         else f"raise data.{s}_fraction")
                smaller = "" if cfg.txt_documents != "file" else ", use data.txt_documents=paragraphs"
                raise PuzzleError(
                    f"the {s} split has no full sequence of {cfg.seq_len} tokens ({counts[s]['tokens']} tokens "
                    f"from {counts[s]['documents']} documents); add text, lower data.seq_len, {share}"
                    f"{smaller} or change data.seed"
                )
        manifest: dict[str, Any] = {
            "seq_len": cfg.seq_len, "dtype": dtype.name, "splits": counts, "sources": sources,
            "tokenizer": tok_id, "config": to_dict(cfg),
        }
        write_json(tmp / RunDir.MANIFEST, manifest)
        write_json(tmp / STAMP, {"stage": "data", "inputs_hash": inputs_hash})
    split_counts = ", ".join(f"{s} {counts[s]['sequences']} ({counts[s]['documents']} documents)" for s in SPLITS)
    print(f"data: sequences of {cfg.seq_len} tokens: {split_counts} -> {out}")
    return out


def _tokenize(files: list[Path], file_keys: dict[str, str], cfg: DataConfig, tokenizer: Tokenizer,
              packers: dict[str, _Packer], limit: int) -> None:
    total = 0
    bos = [tokenizer.bos_id] if cfg.add_bos and tokenizer.bos_id is not None else []
    eos = [tokenizer.eos_id] if cfg.add_eos and tokenizer.eos_id is not None else []
    # Progress in bytes of text: a total (hence an ETA) only when no source is compressed.
    size = None if any(f.suffix.lower() in _OPENERS for f in files) else sum(f.stat().st_size for f in files)
    with tqdm(total=size, desc="data: tokenize", unit="B", unit_scale=True, mininterval=1.0) as bar:
        for path in files:
            for key, pieces in documents(path, cfg, file_keys[str(path)]):
                packer = packers[document_split(key, cfg.seed, cfg.valid_fraction, cfg.test_fraction)]
                started = False  # an empty document (e.g. an empty file) is no document: no BOS/EOS of its own
                for text in pieces:
                    ids = tokenizer.encode(text)
                    if ids and max(ids) >= limit:
                        raise PuzzleError(f"the tokenizer produced id {max(ids)} >= vocabulary size {limit}; "
                                          "use the parent's tokenizer")
                    if ids and not started:
                        packer.documents += 1
                        packer.add(list(bos))
                        started = True
                    packer.add(ids)
                    total += len(ids)
                    bar.update(len(text.encode("utf-8", errors="replace")))
                if started:
                    packer.add(list(eos))
                if cfg.max_tokens is not None and total >= cfg.max_tokens:
                    return
        if size:
            bar.update(max(0, size - bar.n))  # the separators and markup that no piece holds
    if total == 0:
        raise PuzzleError(f"data.sources hold no text ({', '.join(str(f) for f in files)} "
                          f"{'is' if len(files) == 1 else 'are'} empty); add text to them")


def load_tokens(data_dir: str | Path, split: str) -> np.ndarray:
    """The packed sequences of one split (of a data directory, `RunDir.data`) as a read-only memmap
    [num_sequences, seq_len]."""
    data_dir = Path(data_dir)
    if split not in SPLITS:
        raise PuzzleError(f"unknown data split {split!r}; use one of {SPLITS}")
    manifest_path = data_dir / RunDir.MANIFEST
    if not manifest_path.exists():
        raise PuzzleError(f"{manifest_path} does not exist; run `puzzle data` first")
    manifest = read_json(manifest_path)
    if split not in manifest.get("splits", {}):
        raise PuzzleError(f"{data_dir} has no {split} split (written by an older version); "
                          "rerun `puzzle data` to write train / valid / test")
    n, seq_len = manifest["splits"][split]["sequences"], manifest["seq_len"]
    path = data_dir / RunDir.split_file(split)
    dtype = np.dtype(manifest["dtype"])
    if not path.exists() or path.stat().st_size != n * seq_len * dtype.itemsize:
        raise PuzzleError(f"{path} is missing or does not match its manifest; delete {data_dir} and rerun `puzzle data`")
    return np.memmap(path, dtype=dtype, mode="r", shape=(n, seq_len))
