"""demo.tokenizer.train_tokenizer: from a folder's *.txt files, or from a list of files anywhere."""

from __future__ import annotations

import json
from pathlib import Path

from puzzle.demo.tokenizer import train_tokenizer


def _vocab(tok_dir: Path) -> dict[str, int]:
    return json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]


def test_a_file_list_trains_on_exactly_those_files_and_a_folder_on_its_txt_files(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    (corpus / "nested").mkdir(parents=True)
    (corpus / "a.txt").write_text("zebra quartz " * 200)
    (corpus / "nested" / "b.txt").write_text("mollusk vortex " * 200)  # not a top-level *.txt

    from_folder = _vocab(train_tokenizer(corpus, tmp_path / "folder", vocab_size=300))
    assert "zebra" in from_folder and "mollusk" not in from_folder

    listed = [corpus / "nested" / "b.txt", corpus / "a.txt"]
    from_list = _vocab(train_tokenizer(listed, tmp_path / "list", vocab_size=300))
    assert "zebra" in from_list and "mollusk" in from_list

    only_b = _vocab(train_tokenizer(listed[:1], tmp_path / "only_b", vocab_size=300))
    assert "mollusk" in only_b and "zebra" not in only_b
