"""Warnings are kept in the run directory, without duplicates, and shown by the summary."""

from puzzle.core.notices import clear_warnings, read_warnings, warn
from puzzle.stages.report.summary import print_summary


def test_warnings_are_kept_once_shown_in_summary_and_cleared_per_stage(tmp_path, capsys):
    warn(tmp_path, "costs", "no GPU: estimated")
    warn(tmp_path, "costs", "no GPU: estimated")
    warn(tmp_path, "eval", "tokenizer missing")
    assert read_warnings(tmp_path) == [{"stage": "costs", "message": "no GPU: estimated"},
                                       {"stage": "eval", "message": "tokenizer missing"}]
    assert "warning (costs): no GPU: estimated" in capsys.readouterr().err
    print_summary(tmp_path)
    assert "warning (eval): tokenizer missing" in capsys.readouterr().out
    clear_warnings(tmp_path, "costs")
    assert read_warnings(tmp_path) == [{"stage": "eval", "message": "tokenizer missing"}]
