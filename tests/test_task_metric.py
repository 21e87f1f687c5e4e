"""Which number a task reports: acc_norm for multiple choice unless the task names its metric; retention uses it."""

from __future__ import annotations

from pathlib import Path

import pytest

from gkd_helpers import make_run_dir
from puzzle.cli import main
from puzzle.core.errors import PuzzleError
from puzzle.stages.evaluate import stage as eval_stage
from puzzle.stages.evaluate.stage import add_retention
from puzzle.stages.evaluate.tasks import TaskSpec, load_task, primary_metric
from puzzle.stages.report.summary import metric_label, task_score


def test_auto_picks_acc_norm_for_multiple_choice_and_accuracy_for_last_word() -> None:
    assert primary_metric(TaskSpec("h.jsonl"), {"accuracy": 0.3, "acc_norm": 0.4}) == "acc_norm"
    assert primary_metric(TaskSpec("l.jsonl"), {"accuracy": 0.3, "target_nll": 2.0}) == "accuracy"
    assert primary_metric(TaskSpec("h.jsonl", metric="accuracy"), {"accuracy": 0.3, "acc_norm": 0.4}) == "accuracy"
    with pytest.raises(PuzzleError, match="does not apply"):
        primary_metric(TaskSpec("l.jsonl", metric="acc_norm"), {"accuracy": 0.3})
    with pytest.raises(PuzzleError, match="not one of"):
        TaskSpec("x.jsonl", metric="f1")  # type: ignore[arg-type]


def test_retention_and_labels_follow_the_primary_metric() -> None:
    parent = {"tasks": {"hs": {"accuracy": 0.30, "acc_norm": 0.40, "metric": "acc_norm", "score": 0.40}}}
    child = {"tasks": {"hs": {"accuracy": 0.30, "acc_norm": 0.20, "metric": "acc_norm", "score": 0.20}}}
    results = {"parent": parent, "child": child}
    add_retention(results)
    assert child["retention_pct"]["hs"] == pytest.approx(50.0)  # acc_norm 0.20 / 0.40, not accuracy's 100%
    assert metric_label(results, "hs") == "acc_norm"


def test_eval_files_without_a_metric_read_as_accuracy() -> None:
    old = {"parent": {"tasks": {"hs": {"accuracy": 0.5, "acc_norm": 0.6}}},
           "child": {"tasks": {"hs": {"accuracy": 0.25, "acc_norm": 0.6}}}}
    add_retention(old)
    assert task_score(old["child"]["tasks"]["hs"]) == 0.25
    assert old["child"]["retention_pct"]["hs"] == pytest.approx(50.0)
    assert metric_label(old, "hs") == "acc"


def test_a_metric_the_task_lacks_fails_before_any_model_is_scored(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    run, _ = make_run_dir(tmp_path)  # a parent and a child: without the check both would be scored first
    scored: list[str] = []
    monkeypatch.setattr(eval_stage, "evaluate_task", lambda *a, **k: scored.append("task") or {"accuracy": 0.0})
    monkeypatch.setattr(eval_stage, "heldout_metrics", lambda *a, **k: scored.append("heldout") or {})
    lam = tmp_path / "lambada.jsonl"
    lam.write_text('{"text": "the cat sat on the mat"}\n')
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"eval:\n  throughput: false\n  tasks: [{{path: {lam}, metric: acc_norm}}]\n")
    capsys.readouterr()  # the run's set-up output
    assert main(["eval", str(run), "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for words in (str(lam), "last-word", "'acc_norm'", "set metric: accuracy"):
        assert words in err, err
    assert scored == [] and not (run / "eval" / "eval.json").exists()
    # the same file with metric accuracy, and a multiple-choice task with acc_norm, load
    assert load_task(TaskSpec(str(lam), metric="accuracy"))[0].target == " mat"
    mc = tmp_path / "mc.jsonl"
    mc.write_text('{"context": "The cat sat on the", "choices": ["mat", "sky"], "gold": 0}\n')
    assert len(load_task(TaskSpec(str(mc), metric="acc_norm"))) == 1

