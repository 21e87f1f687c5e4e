"""The `data` stage: tokenizing, packing, document split, streaming, manifest, bad input."""

from __future__ import annotations

import hashlib
import json
import lzma
import shutil
from pathlib import Path

import numpy as np
import pytest

from puzzle.core.errors import PuzzleError
from puzzle.stages.data import SPLITS, DataConfig, document_split, load_tokens, run_data, text_key

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
    cfg = DataConfig(sources=[str(src)], seq_len=16, valid_fraction=0.2, test_fraction=0.2, seed=3)
    out = run_data(tmp_path / "run", cfg, tokenizer=ByteTokenizer())
    manifest = json.loads((out / "manifest.json").read_text())
    assert [Path(s["path"]).name for s in manifest["sources"]] == ["a.txt", "b.txt.xz", "c.jsonl"]
    assert all(len(s["sha256"]) == 64 for s in manifest["sources"])
    train, valid, test = (load_tokens(out, s) for s in SPLITS)
    assert train.dtype == np.uint16 and train.shape[1] == 16 and valid.shape[1] == 16 and test.shape[1] == 16
    assert manifest["splits"]["train"]["sequences"] == train.shape[0] > 0 and valid.shape[0] > 0
    assert manifest["splits"]["test"]["sequences"] == test.shape[0] > 0
    # 32 documents, each framed by BOS ... EOS; every token is accounted for before packing.
    docs = sum(manifest["splits"][s]["documents"] for s in SPLITS)
    assert docs == 32
    all_tokens = np.concatenate([train.ravel(), valid.ravel(), test.ravel()])
    assert (all_tokens == 1).sum() <= docs and (all_tokens == 1).sum() > 0
    assert train[0, 0] == 1  # the first train document starts with BOS
    expected = sum(len(ByteTokenizer().encode(t)) + 2 for t in ["hello world\n" * 40, "compressed text " * 50])
    expected += sum(len(f"record {i} " * 8) + 2 for i in range(30))
    assert sum(manifest["splits"][s]["tokens"] for s in SPLITS) == expected


def test_split_is_by_document_and_deterministic(tmp_path: Path) -> None:
    src = tmp_path / "docs"
    src.mkdir()
    texts = {f"d{i}.txt": f"document number {i} " * 20 for i in range(20)}
    for name, text in texts.items():
        (src / name).write_text(text)
    cfg = DataConfig(sources=[str(src)], seq_len=8, valid_fraction=0.3, test_fraction=0.3, seed=1)
    a = run_data(tmp_path / "r1", cfg, tokenizer=ByteTokenizer())
    b = run_data(tmp_path / "r2", cfg, tokenizer=ByteTokenizer())
    assert np.array_equal(load_tokens(a, "train"), load_tokens(b, "train"))
    # Each split's stream is exactly the concatenation of its documents (BOS text EOS), packed: every document
    # lies in one split only. A whole-file document is keyed by the file's content hash.
    def split_of(name: str) -> str:
        return document_split("sha256:" + hashlib.sha256(texts[name].encode()).hexdigest(), 1, 0.3, 0.3)

    members = {s: [name for name in sorted(texts) if split_of(name) == s] for s in SPLITS}
    assert all(0 < len(m) < 20 for m in members.values()) and sum(map(len, members.values())) == 20
    for s in SPLITS:
        stream = [t for name in members[s] for t in [1, *ByteTokenizer().encode(texts[name]), 2]]
        tokens = load_tokens(a, s)
        assert tokens.ravel().tolist() == stream[: tokens.size]
    # rerunning with the same inputs does nothing
    mtime = (a / "train.bin").stat().st_mtime_ns
    run_data(tmp_path / "r1", cfg, tokenizer=ByteTokenizer())
    assert (a / "train.bin").stat().st_mtime_ns == mtime


def test_split_does_not_depend_on_how_the_path_is_typed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "a" / "corpus"
    src.mkdir(parents=True)
    for i in range(30):
        (src / f"d{i}.txt").write_text(f"text of document {i} " * 10)
    copy = shutil.copytree(src, tmp_path / "b" / "elsewhere")
    monkeypatch.chdir(tmp_path / "a")
    cfg = {"seq_len": 8, "valid_fraction": 0.2, "test_fraction": 0.2, "seed": 5}
    runs = [run_data(tmp_path / f"r{i}", DataConfig(sources=[source], **cfg), tokenizer=ByteTokenizer())
            for i, source in enumerate([str(src), "corpus", "./corpus/", str(copy)])]
    for s in SPLITS:
        first = load_tokens(runs[0], s)
        assert first.shape[0] > 0
        for other in runs[1:]:
            assert np.array_equal(load_tokens(other, s), first), s


def test_identical_documents_share_a_split(tmp_path: Path) -> None:
    path = tmp_path / "dup.jsonl"
    texts = [f"unique record {i} " * 4 for i in range(60)] + ["the same record " * 4] * 20
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    cfg = DataConfig(sources=[str(path)], seq_len=8, valid_fraction=0.2, test_fraction=0.2)
    out = run_data(tmp_path / "run", cfg, tokenizer=ByteTokenizer())
    home = document_split(text_key("the same record " * 4), cfg.seed, 0.2, 0.2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"][home]["documents"] >= 20  # all twenty copies went to one split


@pytest.mark.parametrize("values, match", [
    ({"test_fraction": 0.0}, r"data.test_fraction must be in \(0, 1\), got 0.0"),
    ({"valid_fraction": 1.5}, r"data.valid_fraction must be in \(0, 1\), got 1.5"),
    ({"valid_fraction": 0.5, "test_fraction": 0.5}, "valid_fraction \\+ data.test_fraction must be below 1"),
    ({"seq_len": 1}, "data.seq_len must be at least 2, got 1"),
    ({"max_tokens": 0}, "data.max_tokens must be positive"),
])
def test_config_values_checked_when_built(values: dict, match: str) -> None:
    with pytest.raises(PuzzleError, match=match):
        DataConfig(**values)


def test_empty_test_split_says_which_fraction(tmp_path: Path) -> None:
    src = tmp_path / "few"
    src.mkdir()
    for i in range(3):
        (src / f"d{i}.txt").write_text(f"document {i} " * 30)
    with pytest.raises(PuzzleError, match=r"the (valid|test) split has no full sequence.*raise data\.(valid|test)_fraction"):
        run_data(tmp_path / "run", DataConfig(sources=[str(src)], seq_len=8, valid_fraction=0.01, test_fraction=0.01),
                 tokenizer=ByteTokenizer())
    assert not (tmp_path / "run" / "data").exists()


def test_data_written_before_test_splits_existed_is_named(tmp_path: Path) -> None:
    src = _corpus(tmp_path)
    out = run_data(tmp_path / "run", DataConfig(sources=[str(src)], seq_len=16, valid_fraction=0.2, test_fraction=0.2,
                                                seed=3), tokenizer=ByteTokenizer())
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["splits"]["test"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert load_tokens(out, "valid").shape[0] > 0
    with pytest.raises(PuzzleError, match="has no test split.*rerun `puzzle data`"):
        load_tokens(out, "test")


def test_parquet_and_max_tokens(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": [f"row {i} " * 10 for i in range(200)]}), path, row_group_size=50)
    cfg = DataConfig(sources=[str(path)], seq_len=8, valid_fraction=0.1, text_field="body", max_tokens=5000)
    out = run_data(tmp_path / "run", cfg, tokenizer=ByteTokenizer())
    manifest = json.loads((out / "manifest.json").read_text())
    total = sum(manifest["splits"][s]["tokens"] for s in SPLITS)
    assert 5000 <= total < 5000 + 200  # stopped after the document that crossed the limit


def test_paragraph_documents(tmp_path: Path) -> None:
    path = tmp_path / "one.txt"
    path.write_text("\n\n".join(f"paragraph {i} " * 6 for i in range(40)))
    with pytest.raises(PuzzleError, match="no full sequence"):  # one file = one document: no valid split
        run_data(tmp_path / "r1", DataConfig(sources=[str(path)], seq_len=8), tokenizer=ByteTokenizer())
    cfg = DataConfig(sources=[str(path)], seq_len=8, valid_fraction=0.2, test_fraction=0.2,
                     txt_documents="paragraphs")
    out = run_data(tmp_path / "r2", cfg, tokenizer=ByteTokenizer())
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(manifest["splits"][s]["documents"] for s in SPLITS) == 40
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
    from puzzle.formats import save_model
    from puzzle.model.decoder import build_model
    from puzzle.model.presets import tiny_llama_config

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


def test_an_empty_text_file_is_an_error_not_two_tokens(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(PuzzleError, match="no text") as e:
        run_data(tmp_path / "run", DataConfig(sources=[str(tmp_path / "empty.txt")], seq_len=16),
                 tokenizer=ByteTokenizer())
    assert "empty.txt" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run" / "data").exists()
