"""A parent's tokenizer travels to what is written from it: one that does not load is an error, never dropped;
a parent that has none gives a warning kept in the run."""

from __future__ import annotations

from pathlib import Path

import pytest

from puzzle.cli import main
from puzzle.core.errors import PuzzleError
from puzzle.core.notices import read_warnings
from puzzle.formats import save_model
from puzzle.model.blocks import BlockConfig
from puzzle.model.decoder import build_model
from puzzle.model.presets import tiny_llama_config
from puzzle.stages.importer import run_import
from puzzle.stages.realize import run_realize
from test_realize import ATTS, FFNS, _make_run, _write_solution

BROKEN = b"this is not a SentencePiece model"


def test_realize_with_a_broken_parent_tokenizer_fails(tmp_path: Path) -> None:
    _make_run(tmp_path)
    _write_solution(tmp_path, [BlockConfig(ATTS[1], FFNS[1])] * 4)
    (tmp_path / "parent" / "tokenizer.model").write_bytes(BROKEN)
    with pytest.raises(PuzzleError, match="tokenizer.model is not a SentencePiece model"):
        run_realize(tmp_path, "child-0")
    assert not (tmp_path / "children" / "child-0").exists()


def test_realize_without_a_parent_tokenizer_warns_in_the_run(tmp_path: Path) -> None:
    _make_run(tmp_path)
    _write_solution(tmp_path, [BlockConfig(ATTS[1], FFNS[1])] * 4)
    out = run_realize(tmp_path, "child-0")
    assert not list(out.glob("tokenizer*"))
    assert [w["stage"] for w in read_warnings(tmp_path) if "no tokenizer" in w["message"]] == ["realize"]


def _bare_parent(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    save_model(build_model(tiny_llama_config(num_layers=2), seed=0), src)
    return src


def test_import_keeps_the_missing_tokenizer_warning_and_rejects_a_broken_one(tmp_path: Path) -> None:
    src = _bare_parent(tmp_path)
    run_import(tmp_path / "run", str(src))
    assert [w["stage"] for w in read_warnings(tmp_path / "run")] == ["import"]
    (src / "tokenizer.model").write_bytes(BROKEN)
    with pytest.raises(PuzzleError, match="not a SentencePiece model"):
        run_import(tmp_path / "run2", str(src))


def test_export_with_a_broken_tokenizer_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = _bare_parent(tmp_path)
    (src / "tokenizer.model").write_bytes(BROKEN)
    assert main(["export", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a SentencePiece model" in err, err
    assert not (tmp_path / "out").exists()
