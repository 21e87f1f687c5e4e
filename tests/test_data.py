"""The `data` stage: tokenizing, packing, document split, streaming, manifest, bad input."""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import numpy as np
import pytest

from puzzle.data import DataConfig, is_valid_document, load_tokens, run_data
from puzzle.errors import PuzzleError

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"


class ByteTokenizer:
    """Stand-in tokenizer: bytes + 3 (0 pad, 1 BOS, 2 EOS)."""

    bos_id, eos_id, vocab_size = 1, 2, 259

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode()]


def _corpus(tmp: Path) -> Path:
    src = tmp / "corpus"
    src.mkdir()
    (src / "a.txt").write_text("hello world\n" * 40)
    with lzma.open(src / "b.txt.xz", "wt") as f:
        f.write("compressed text " * 50)
    (src / "c.jsonl").write_text("\n".join(json.dumps({"text": f"record {i} " * 8, "id": i}) for i in range(30)))
    return src


def test_packs_all_sources_with_bos_eos_and_manifest(tmp_path: Path) -> None:
    src = _corpus(tmp_path)
    cfg = DataConfig(sources=[str(src)], seq_len=16, valid_fraction=0.2, seed=3)
    out = run_data(tmp_path / "run", cfg, tokenizer=ByteTokenizer())
    manifest = json.loads((out / "manifest.json").read_text())
    assert [Path(s["path"]).name for s in manifest["sources"]] == ["a.txt", "b.txt.xz", "c.jsonl"]
    assert all(len(s["sha256"]) == 64 for s in manifest["sources"])
    train, valid = load_tokens(out, "train"), load_tokens(out, "valid")
    assert train.dtype == np.uint16 and train.shape[1] == 16 and valid.shape[1] == 16
    assert manifest["splits"]["train"]["sequences"] == train.shape[0] > 0 and valid.shape[0] > 0
    # 32 documents, each framed by BOS ... EOS; every token is accounted for before packing.
    docs = manifest["splits"]["train"]["documents"] + manifest["splits"]["valid"]["documents"]
    assert docs == 32
    all_tokens = np.concatenate([train.ravel(), valid.ravel()])
    assert (all_tokens == 1).sum() <= docs and (all_tokens == 1).sum() > 0
    assert train[0, 0] == 1  # the first train document starts with BOS
    expected = sum(len(ByteTokenizer().encode(t)) + 2 for t in ["hello world\n" * 40, "compressed text " * 50])
    expected += sum(len(f"record {i} " * 8) + 2 for i in range(30))
    assert manifest["splits"]["train"]["tokens"] + manifest["splits"]["valid"]["tokens"] == expected


def test_split_is_by_document_and_deterministic(tmp_path: Path) -> None:
    src = tmp_path / "docs"
    src.mkdir()
    texts = {f"d{i}.txt": f"document number {i} " * 20 for i in range(20)}
    for name, text in texts.items():
        (src / name).write_text(text)
    cfg = DataConfig(sources=[str(src)], seq_len=8, valid_fraction=0.3, seed=1)
    a = run_data(tmp_path / "r1", cfg, tokenizer=ByteTokenizer())
    b = run_data(tmp_path / "r2", cfg, tokenizer=ByteTokenizer())
    assert np.array_equal(load_tokens(a, "train"), load_tokens(b, "train"))
    # The valid stream is exactly the concatenation of the valid documents (BOS text EOS), packed.
    valid_docs = [name for name in sorted(texts) if is_valid_document(str(src / name), 1, 0.3)]
    assert 0 < len(valid_docs) < 20
    stream = [t for name in valid_docs for t in [1, *ByteTokenizer().encode(texts[name]), 2]]
    valid = load_tokens(a, "valid")
    assert valid.ravel().tolist() == stream[: valid.size]
    # rerunning with the same inputs does nothing
    mtime = (a / "train.bin").stat().st_mtime_ns
    run_data(tmp_path / "r1", cfg, tokenizer=ByteTokenizer())
    assert (a / "train.bin").stat().st_mtime_ns == mtime


def test_parquet_and_max_tokens(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": [f"row {i} " * 10 for i in range(200)]}), path, row_group_size=50)
    cfg = DataConfig(sources=[str(path)], seq_len=8, valid_fraction=0.1, text_field="body", max_tokens=5000)
    out = run_data(tmp_path / "run", cfg, tokenizer=ByteTokenizer())
    manifest = json.loads((out / "manifest.json").read_text())
    total = manifest["splits"]["train"]["tokens"] + manifest["splits"]["valid"]["tokens"]
    assert 5000 <= total < 5000 + 200  # stopped after the document that crossed the limit


def test_paragraph_documents(tmp_path: Path) -> None:
    path = tmp_path / "one.txt"
    path.write_text("\n\n".join(f"paragraph {i} " * 6 for i in range(40)))
    with pytest.raises(PuzzleError, match="no full sequence"):  # one file = one document: no valid split
        run_data(tmp_path / "r1", DataConfig(sources=[str(path)], seq_len=8), tokenizer=ByteTokenizer())
    cfg = DataConfig(sources=[str(path)], seq_len=8, valid_fraction=0.2, txt_documents="paragraphs")
    out = run_data(tmp_path / "r2", cfg, tokenizer=ByteTokenizer())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["valid"]["documents"] == 40
    assert not (tmp_path / "r1" / "data").exists()  # the failed run left nothing behind


@pytest.mark.parametrize("make, match", [
    (lambda p: [], "sources is empty"),
    (lambda p: [str(p / "missing")], "does not exist"),
    (lambda p: [str(p / "empty")], "holds no"),
    (lambda p: [str(p / "short.txt")], "no full sequence"),
])
def test_bad_corpus(tmp_path: Path, make, match) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "short.txt").write_text("hi")
    with pytest.raises(PuzzleError, match=match):
        run_data(tmp_path / "run", DataConfig(sources=make(tmp_path), seq_len=64), tokenizer=ByteTokenizer())


def test_vocabulary_mismatch_with_parent(tmp_path: Path) -> None:
    from puzzle.checkpoints import save_model
    from puzzle.model import build_model
    from puzzle.presets import tiny_llama_config

    save_model(build_model(tiny_llama_config(num_layers=1, vocab_size=128), seed=0), tmp_path / "run" / "parent")
    src = _corpus(tmp_path)
    with pytest.raises(PuzzleError, match="parent's vocabulary"):
        run_data(tmp_path / "run", DataConfig(sources=[str(src)], seq_len=16), tokenizer=ByteTokenizer())


def test_cli_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from puzzle.cli import main

    assert main(["data", str(tmp_path / "run"), f"sources=[{tmp_path / 'nope'}]"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.skipif(not (SHARED / "models" / "ref-s" / "tokenizer.model").exists(), reason="../shared absent")
def test_real_gutenberg_with_parent_tokenizer(tmp_path: Path) -> None:
    from puzzle.cli import main

    books = sorted((SHARED / "data" / "text" / "gutenberg").glob("*.txt.xz"))[:3]
    tok = SHARED / "models" / "ref-s"
    args = ["data", str(tmp_path / "run"), "seq_len=128", "valid_fraction=0.5", "txt_documents=paragraphs",
            "max_tokens=20000", f"sources=[{','.join(map(str, books))}]", "--tokenizer", str(tok)]
    assert main(args) == 0
    train = load_tokens(tmp_path / "run" / "data", "train")
    assert train.shape[1] == 128 and train.shape[0] > 10 and int(train.max()) < 32000
