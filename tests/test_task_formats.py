"""Task layouts users already hold: every example in docs/tasks.md parses to the prompt lm-eval builds, labels
files and letter keys map to gold indices, per-choice contexts and separators are scored as written, bad
records are one line naming file, line and field, and the shared task files score exactly as before."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path

import pytest
import torch

from gkd_helpers import ByteTokenizer, one_torch_thread, tiny_parent  # noqa: F401  (autouse fixture)
from puzzle.cli import main
from puzzle.core.errors import PuzzleError
from puzzle.stages.evaluate.task_formats import LAYOUTS, MultipleChoiceItem, TaskFormat, detect_format
from puzzle.stages.evaluate.tasks import TaskSpec, evaluate_task, load_task, score_requests, split_request

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "data" / "tasks"
CPU = torch.device("cpu")


def doc_examples() -> list[tuple[str, str, str]]:
    """(format, file kind, body) of each example block in docs/tasks.md, under its `### `format`` heading."""
    out = []
    for section in re.split(r"^### ", (ROOT / "docs" / "tasks.md").read_text(), flags=re.MULTILINE)[1:]:
        fmt = re.match(r"`([\w-]+)`", section).group(1)  # type: ignore[union-attr]
        out += [(fmt, kind, body) for kind, body in re.findall(r"```(jsonl|csv)\n(.*?)```", section, re.DOTALL)]
    return out


WINO = "Sarah was a much better surgeon than Maria so "
EXPECTED = {  # format -> (requests of its first documented example, gold)
    "jsonl": ([("The cat sat on the", " mat"), ("The cat sat on the", " moon")], 0),
    "query": ([("Question: What is the boiling point of water at sea level?\nAnswer:", " 100 C"),
               ("Question: What is the boiling point of water at sea level?\nAnswer:", " 50 C")], 0),
    "hellaswag-hf": ([("Roof shingle removal: A man is sitting on a roof. He", " is using wrap to wrap a pair of skis."),
                      ("Roof shingle removal: A man is sitting on a roof. He", " is ripping level tiles off."),
                      ("Roof shingle removal: A man is sitting on a roof. He", " is holding a rubik's cube."),
                      ("Roof shingle removal: A man is sitting on a roof. He",
                       " starts pulling up roofing on a roof.")], 3),
    "arc": ([("Question: Which gas do plants take in for photosynthesis?\nAnswer:", " " + c)
             for c in ("oxygen", "carbon dioxide", "nitrogen", "helium")], 1),
    "mmlu": ([(("What is the embryological origin of the hyoid bone?\nA. The first pharyngeal arch\n"
                "B. The first and second pharyngeal arches\nC. The second pharyngeal arch\n"
                "D. The second and third pharyngeal arches\nAnswer:"), " " + k) for k in "ABCD"], 3),
    "winogrande": ([(WINO + "Sarah", " always got the harder cases."),
                    (WINO + "Maria", " always got the harder cases.")], 0),
    "boolq": ([(("Persian (Farsi) is a Western Iranian language.\nQuestion: is persian and farsi the same "
                 "language?\nAnswer:"), " " + c) for c in ("no", "yes")], 1),
    "mmlu-csv": ([("Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer:",
                   " " + k) for k in "ABCD"], 1),
}


def test_every_layout_is_documented_and_the_format_option_knows_it() -> None:
    documented = {fmt for fmt, _, _ in doc_examples()}
    assert set(LAYOUTS) | {"mmlu-csv", "hellaswag", "lambada"} == set(typing.get_args(TaskFormat)) - {"auto"}
    assert set(LAYOUTS) | {"mmlu-csv"} <= documented
    assert set(EXPECTED) == set(LAYOUTS) - {"piqa"} | {"mmlu-csv"}


@pytest.mark.parametrize("fmt, kind, body", doc_examples(), ids=[f"{f}-{i}" for i, (f, _, _) in
                                                                  enumerate(doc_examples())])
def test_documented_example_parses_to_lm_eval_prompt(tmp_path: Path, fmt: str, kind: str, body: str) -> None:
    path = tmp_path / f"example.{kind}"
    path.write_text(body)
    assert detect_format(path) == fmt
    (item,) = load_task(TaskSpec(str(path)))
    assert load_task(TaskSpec(str(path), format=fmt)) == [item]  # type: ignore[arg-type]
    if fmt in EXPECTED and body.startswith(("{\"context\"", "{\"query", "{\"activity", "{\"question", "{\"sentence",
                                            "{\"passage", "\"Find")):
        assert (item.requests(), item.gold) == EXPECTED[fmt]
    if body.startswith("{\"contexts\""):  # one context per choice: the choice ends the context
        assert item.requests()[0] == ("The trophy did not fit in the suitcase because the trophy", " was too big.")
        assert item.gold == 0


def test_labels_file_beside_the_questions(tmp_path: Path) -> None:
    """PIQA's release: valid.jsonl without labels + valid-labels.lst; letter and boolean keys map to indices."""
    q = tmp_path / "valid.jsonl"
    q.write_text("".join(json.dumps({"goal": f"g{i}", "sol1": "a", "sol2": "b"}) + "\n" for i in range(3)))
    labels = tmp_path / "valid-labels.lst"
    labels.write_text("1\n0\n1\n")
    items = load_task(TaskSpec(str(q), labels=str(labels)))
    assert [it.gold for it in items] == [1, 0, 1] and items[0].context == "Question: g0\nAnswer:"
    assert [it.gold for it in load_task(TaskSpec(str(q), labels=str(labels), limit=2))] == [1, 0]
    labels.write_text("1\n0\n")
    with pytest.raises(PuzzleError, match=r"valid-labels.lst has 2 labels but .*valid.jsonl has 3 records"):
        load_task(TaskSpec(str(q), labels=str(labels)))
    labels.write_text("1\n0\nB\n")
    assert load_task(TaskSpec(str(q), labels=str(labels)))[2].gold == 1  # letter key
    labels.write_text("1\n7\n0\n")
    with pytest.raises(PuzzleError, match=r"valid-labels.lst:2: gold 'label' is \"7\""):
        load_task(TaskSpec(str(q), labels=str(labels)))
    b = tmp_path / "boolq.jsonl"
    b.write_text(json.dumps({"passage": "p", "question": "q", "label": 0}) + "\n")
    assert load_task(TaskSpec(str(b)))[0].gold == 0


def test_separator_is_inserted_verbatim() -> None:
    item = MultipleChoiceItem("Q: 1+1?\nA:", (" 2", "3"), 0)
    assert item.requests() == [("Q: 1+1?\nA:", " 2"), ("Q: 1+1?\nA:", " 3")]  # default: one space
    assert MultipleChoiceItem("The cat sat on the", (" mat", "s"), 0, "").requests() == [
        ("The cat sat on the", " mat"), ("The cat sat on the", "s")]
    assert MultipleChoiceItem("Q:", ("a", "b"), 0, "\n").requests()[1] == ("Q:", "\nb")


def test_separator_option_applies_to_a_task_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"context": "x =", "choices": ["1", " 2"], "gold": 0}) + "\n")
    (item,) = load_task(TaskSpec(str(path), separator=""))
    assert item.requests() == [("x =", "1"), ("x =", " 2")]


def test_per_choice_context_is_what_gets_scored() -> None:
    """A fake model that predicts the shared continuation well only after "Xavier": partial scoring picks the
    option whose context holds it; ignoring the per-choice contexts would tie and pick the first option."""
    tok = ByteTokenizer()
    marker = tok.encode("X")[0]

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, V]
        logits = torch.zeros(*ids.shape, tok.vocab_size)
        seen = (ids == marker).cumsum(1) > 0  # [B, T]: the marker appeared at or before t
        logits[..., 0] = torch.where(seen, 0.0, 30.0)  # without it, all mass on the pad id
        return logits

    item = MultipleChoiceItem("Maria beat ", ("Maria", "Xavier"), 1, "", " at chess.")
    assert evaluate_task([item], logits_fn, tok.encode, tok.bos_id, CPU, 4, 512)["accuracy"] == 1.0


BAD = [
    ("piqa.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}, {"goal": "g", "sol1": "a", "sol2": "b",
                                                                         "label": 2}],
     ("piqa.jsonl:2", "'label'", "2")),
    ("wino.jsonl", [{"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}],
     ("wino.jsonl:1", "'sentence'", "_")),
    ("arc.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": "E"}], ("arc.jsonl:1", "'answer'", '"E"')),
    ("arc-dict.jsonl", [{"question": "q", "choices": {"text": ["a", "b"]}, "answerKey": "A"}],
     ("arc-dict.jsonl:1", "'label'")),
    ("boolq.jsonl", [{"passage": "p", "question": "q", "answer": "maybe"}], ("boolq.jsonl:1", "'answer'")),
    ("hs.jsonl", [{"ctx": "c", "endings": "abcd", "label": 0}], ("hs.jsonl:1", "'endings'", "list")),
    ("query.jsonl", [{"query": 3, "choices": ["a", "b"], "gold": 0}], ("query.jsonl:1", "'query'", "string")),
]


@pytest.mark.parametrize("name, records, words", BAD, ids=[b[0] for b in BAD])
def test_bad_record_is_one_line_naming_file_line_field(tmp_path: Path, capsys: pytest.CaptureFixture, name: str,
                                                       records: list[dict], words: tuple[str, ...]) -> None:
    task = tmp_path / name
    task.write_text("".join(json.dumps(r) + "\n" for r in records))
    run = tmp_path / "run"
    run.mkdir()
    assert main(["eval", str(run), "--task", str(task)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err


def test_bad_csv_row_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "anatomy_test.csv"
    path.write_text('"multi\nline question",a,b,c,d,A\nshort,B\n')
    with pytest.raises(PuzzleError, match=r"anatomy_test.csv:3: an MMLU CSV row .* 2 columns"):
        load_task(TaskSpec(str(path)))


def _old_scores(items: list, logits_fn, tok: ByteTokenizer, max_len: int) -> dict[str, float]:
    """Multiple-choice accuracy as computed before per-item separators: one space, then the stripped choice."""
    reqs = [split_request(tok.encode, it.context, " " + c.lstrip(" "), tok.bos_id) for it in items for c in it.choices]
    scored = score_requests(logits_fn, reqs, CPU, 8, max_len)
    correct = correct_norm = pos = 0
    for it in items:
        n = len(it.choices)
        lls = [s for s, _ in scored[pos:pos + n]]
        lengths = [len((" " + c.lstrip(" ")).encode()) for c in it.choices]
        correct += max(range(n), key=lambda j: lls[j]) == it.gold
        correct_norm += max(range(n), key=lambda j: lls[j] / lengths[j]) == it.gold
        pos += n
    return {"accuracy": correct / len(items), "acc_norm": correct_norm / len(items), "n": len(items)}


@pytest.mark.parametrize("name", ["hellaswag_val.txt.bz2", "piqa_valid.jsonl"])
def test_shared_task_files_score_as_before(name: str) -> None:
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"{path} absent (shared data not mounted)")
    items = load_task(TaskSpec(str(path)))
    assert all(it.requests() == [(it.context, " " + c.lstrip(" ")) for c in it.choices] for it in items)
    model, tok = tiny_parent(vocab=ByteTokenizer.vocab_size).eval(), ByteTokenizer()
    some = items[:24]
    with torch.no_grad():
        new = evaluate_task(some, lambda ids: model(ids).logits, tok.encode, tok.bos_id, CPU, 8, 1024)
        old = _old_scores(some, lambda ids: model(ids).logits, tok, 1024)
    assert new == old


def test_task_entry_options_survive_the_run_config_and_task_limit(tmp_path: Path) -> None:
    """eval.tasks[] in a run config: format, labels and separator reach the reader, also under eval.task_limit."""
    from puzzle.core.config import from_dict
    from puzzle.stages.evaluate.stage import EvalConfig, load_tasks

    q = tmp_path / "valid.jsonl"
    q.write_text("".join(json.dumps({"goal": f"g{i}", "sol1": "a", "sol2": "b"}) + "\n" for i in range(3)))
    labels = tmp_path / "valid-labels.lst"
    labels.write_text("1\n0\n1\n")
    cfg = from_dict(EvalConfig, {"task_limit": 2, "tasks": [
        {"path": str(q), "format": "piqa", "labels": str(labels), "separator": "\n"}]})
    (items,) = load_tasks(cfg).values()
    assert [it.gold for it in items] == [1, 0] and items[0].requests()[0] == ("Question: g0\nAnswer:", "\na")
    with pytest.raises(PuzzleError, match="'piqa-v2' is not one of"):
        from_dict(EvalConfig, {"tasks": [{"path": str(q), "format": "piqa-v2"}]})


def test_directory_of_mmlu_csvs_is_one_task(tmp_path: Path) -> None:
    mmlu = tmp_path / "mmlu" / "test"
    mmlu.mkdir(parents=True)
    (mmlu / "anatomy_test.csv").write_text('"q1",a,b,c,d,A\n"q2",a,b,c,d,B\n')
    (mmlu / "virology_test.csv").write_text('"q3",a,b,c,d,D\n')
    (mmlu / "README.txt").write_text("not a task\n")
    items = load_task(TaskSpec(str(mmlu)))
    assert [it.gold for it in items] == [0, 1, 3] and items[2].context.startswith("q3\nA. a")
    assert len(load_task(TaskSpec(str(mmlu), limit=1))) == 2  # the limit is per file
    with pytest.raises(PuzzleError, match="holds no .csv files"):
        load_task(TaskSpec(str(tmp_path)))
