"""Bad task files: `puzzle eval --task FILE` ends with one line naming the file, the line and the fix (exit 2,
no traceback, nothing written); a UTF-8 byte-order mark is simply accepted; task results never overwrite
each other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from puzzle.cli import main
from puzzle.core.config import from_dict
from puzzle.core.errors import PuzzleError
from puzzle.stages.evaluate.stage import EvalConfig, load_tasks
from puzzle.stages.evaluate.tasks import TaskSpec, load_task

GOOD = {"context": "The cat sat on the", "choices": ["mat", "sky"], "gold": 0}


def _line(record: object) -> bytes:
    return json.dumps(record).encode() + b"\n"


def _eval_fails(tmp_path: Path, task: Path, capsys: pytest.CaptureFixture, *words: str) -> str:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    assert main(["eval", str(run), "--task", str(task)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    assert not (run / "eval").exists(), "nothing is written"
    return err


CASES = [
    ("bad-byte.jsonl", _line(GOOD) + b'{"context": "caf\xe9", "choices": ["a", "b"], "gold": 0}\n',
     ("bad-byte.jsonl:2", "0xe9", "not UTF-8")),
    ("bad-first.jsonl", b"{not json\n" + _line(GOOD), ("bad-first.jsonl:1", "not valid JSON")),
    ("bad-later.jsonl", _line(GOOD) + b"\n[1, 2\n", ("bad-later.jsonl:3", "not valid JSON")),
    ("no-choices.jsonl", _line({"context": "a", "gold": 0}), ("no-choices.jsonl:1", "missing 'choices'")),
    ("neither.jsonl", _line({"prompt": "a"}), ("neither.jsonl:1", '"text" (LAMBADA)', "'prompt'")),
    ("not-object.jsonl", _line(["a", "b"]), ("not-object.jsonl:1", "not an object")),
    ("null-context.jsonl", _line({**GOOD, "context": None}), ("null-context.jsonl:1", '"context" must be a string')),
    ("string-gold.jsonl", _line(GOOD) + _line({**GOOD, "gold": "1"}),
     ("string-gold.jsonl:2", '"gold" must be an integer index', '"1"')),
    ("bool-gold.jsonl", _line({**GOOD, "gold": True}), ("bool-gold.jsonl:1", "integer index")),
    ("lambada.jsonl", _line({"text": "one two"}) + _line({"text": "single"}), ("lambada.jsonl:2", "two words")),
    ("hs.txt", b"ctx\n1\na\nb\nc\n\xff\n", ("hs.txt:6", "not UTF-8")),
]


@pytest.mark.parametrize("name, content, words", CASES, ids=[c[0] for c in CASES])
def test_bad_task_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, name: str, content: bytes,
                                   words: tuple[str, ...]) -> None:
    task = tmp_path / name
    task.write_bytes(content)
    err = _eval_fails(tmp_path, task, capsys, *words)
    assert "LAMBADA line" not in err or name == "lambada.jsonl", "the format is detected from the right fields"


def test_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    mc = tmp_path / "bom.jsonl"
    mc.write_bytes(b"\xef\xbb\xbf" + _line(GOOD))
    assert load_task(TaskSpec(str(mc)))[0].context == GOOD["context"]
    lam = tmp_path / "bom-lambada.jsonl"
    lam.write_bytes(b"\xef\xbb\xbf" + _line({"text": "one two"}))
    assert load_task(TaskSpec(str(lam)))[0].context == "one"
    hs = tmp_path / "bom.txt"
    hs.write_bytes(b"\xef\xbb\xbfctx\r\n1\r\na\r\nb\r\nc\r\nd\r\n")
    item = load_task(TaskSpec(str(hs)))[0]
    assert item.context == "ctx" and item.choices == ("a", "b", "c", "d") and item.gold == 1


def _task(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_line(GOOD))
    return str(path)


def test_same_file_name_in_two_directories_gives_two_results(tmp_path: Path) -> None:
    a, b = _task(tmp_path / "x" / "a" / "mine.jsonl"), _task(tmp_path / "y" / "b" / "mine.jsonl")
    other = _task(tmp_path / "other.jsonl")
    cfg = from_dict(EvalConfig, {"tasks": [{"path": a}, {"path": b}, {"path": other}]})
    assert list(load_tasks(cfg)) == ["a/mine", "b/mine", "other"]
    deeper = _task(tmp_path / "z" / "a" / "mine.jsonl")  # same parent name too: one more directory
    cfg = from_dict(EvalConfig, {"tasks": [{"path": a}, {"path": deeper}]})
    assert list(load_tasks(cfg)) == ["x/a/mine", "z/a/mine"]
    cfg = from_dict(EvalConfig, {"tasks": [{"path": a, "name": "mine"}, {"path": b}]})
    assert list(load_tasks(cfg)) == ["mine", "b/mine"]


def test_a_task_listed_twice_or_two_equal_names_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a, b = _task(tmp_path / "a" / "mine.jsonl"), _task(tmp_path / "b" / "mine.jsonl")
    cfg = from_dict(EvalConfig, {"tasks": [{"path": a, "name": "t"}, {"path": b, "name": "t"}]})
    with pytest.raises(PuzzleError, match="two eval tasks are named 't'"):
        load_tasks(cfg)
    run = tmp_path / "run"
    run.mkdir()
    assert main(["eval", str(run), "--task", a, "--task", a]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "listed twice" in err and "mine.jsonl" in err, err
