"""`puzzle eval` scores task files on a model without a data split (held-out metrics skipped with a note) and
prints task accuracy as a table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gkd_helpers import make_run_dir, one_torch_thread  # noqa: F401  (autouse fixture)
from puzzle.cli import main
from puzzle.stages.evaluate.tables import task_table


def test_task_table_shows_accuracy_acc_norm_and_retention() -> None:
    models = {"parent": {"tasks": {"piqa": {"accuracy": 0.625, "acc_norm": 0.5}, "lambada": {"accuracy": 0.25}},
                         "mean_retention_pct": 100.0},
              "child": {"tasks": {"piqa": {"accuracy": 0.5, "acc_norm": 0.5}}, "mean_retention_pct": 80.0}}
    lines = task_table(models).splitlines()
    assert lines[0].split() == ["task", "accuracy", "%", "piqa", "lambada", "retained", "%"]
    assert lines[1].split() == ["parent", "62.5/50.0", "25.0", "100.0"]
    assert lines[2].split() == ["child", "50.0/50.0", "-", "80.0"]
    assert task_table({"parent": {}}) == ""


def test_eval_scores_tasks_on_a_model_without_a_data_split(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run, _ = make_run_dir(tmp_path)
    model_dir = tmp_path / "model"
    shutil.copytree(run / "parent", model_dir)  # a model on its own, outside any run
    task = tmp_path / "mine.jsonl"
    task.write_text("".join(json.dumps({"context": "The cat sat on the", "choices": ["mat", "sun", "tree"],
                                        "gold": g}) + "\n" for g in (0, 1, 2, 0)))
    out = tmp_path / "out"
    out.mkdir()
    assert main(["eval", str(out), "--task", str(task), f"parent={model_dir}", "throughput=false"]) == 0
    printed = capsys.readouterr()
    result = json.loads((out / "eval" / "eval.json").read_text())
    assert result["heldout_skipped"] and result["sequences"] == 0
    parent = result["models"]["parent"]
    assert "lm_loss" not in parent and parent["tasks"]["mine"]["n"] == 4
    assert "held-out metrics skipped" in printed.out and "held-out" in printed.err  # the note, kept as a warning
    lines = printed.out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("task accuracy"))
    header, row = lines[at:at + 2]
    assert header.split()[3] == "mine" and row.split()[0] == "parent"
    mine = parent["tasks"]["mine"]
    assert row.split()[1] == f"{100 * mine['accuracy']:.1f}/{100 * mine['acc_norm']:.1f}"
    assert "held-out" in (out / "warnings.json").read_text()
    # with neither a data split nor tasks there is nothing to score: the data error, one line, exit 2
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(tmp_path / "empty"), f"parent={model_dir}"]) == 2
    assert "puzzle data" in capsys.readouterr().err
