"""Cost-model errors are scored on models the calibration was not fitted on (benchmarks/calibration_scores.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from calibration_scores import held_out_errors, main, reference_run


def test_the_parent_is_kept_apart_from_the_evidence():
    rows = [{"model": "parent", "workload": "w", "rel_error_none": 0.5, "rel_error_scale": 0.0},
            {"model": "child1", "workload": "w", "rel_error_none": -0.02, "rel_error_scale": 0.03},
            {"model": "child2", "workload": "w", "rel_error_none": 0.01, "rel_error_scale": -0.01}]
    s = held_out_errors(rows, ("none", "scale"))
    assert s["none"]["max_abs"] == pytest.approx(0.02) and s["none"]["n"] == 2
    assert s["scale"]["mean_abs"] == pytest.approx(0.02)
    assert s["none"]["parent"] == {"w": 0.5} and s["scale"]["parent"] == {"w": 0.0}


def test_the_reference_run_is_rescored_from_its_own_files():
    """The calibrated predictions re-made from the committed costs equal what the run's search predicted, so
    the uncalibrated and width-consistent columns are computed on the same footing."""
    run = BENCHMARKS / "results" / "reference_ref_s"
    solutions = {s["name"]: s for s in json.loads((run / "solutions.json").read_text())["solutions"]}
    measured = json.loads((run / "eval.json").read_text())["models"]
    _, scores = reference_run(run)
    rows = {r["model"]: r for r in scores["rows"]["text-generation-1k"]}
    for name, sol in solutions.items():
        predicted = sol["predicted"]["text-generation-1k"]["throughput_tok_s"]
        tok_s = measured[name]["throughput"]["text-generation-1k"]["output_tokens_per_s"]
        assert rows[name]["rel_error_calibrated"] == pytest.approx(predicted / tok_s - 1, rel=1e-6)
    children = scores["children"]["text-generation-1k"]
    assert children["calibrated"]["n"] == 2 * len(solutions)  # each child before and after uptraining
    assert "text-generation-1k" in children["calibrated"]["parent"]


def test_the_script_reads_every_committed_result(tmp_path, capsys):
    assert main(["--json", str(tmp_path / "scores.json")]) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert {"cost_model_ref_s.json", "runtime_throughput.json"} <= set(scores["cost_model"])
    assert "cost_additivity_b1.json:neighbourhood" in scores["cost_additivity"]
    assert "fitted on, not evidence" in capsys.readouterr().out


def test_cost_additivity_rescores_a_run_stopped_before_its_last_models(tmp_path, monkeypatch):
    """A run cut short after the stacks and some models: --rescore predicts those models exactly as the whole run
    would have (each model's prediction depends on the stacks and the parent only)."""
    import cost_additivity

    def fake_measure(name, config, w, ctx, device, dtype, repeats, inner, loop=False):  # bytes stand in for time
        return {"step_s": 1e-3 + config.param_count() * 1e-9 + 1e-6 * len(name), "rel_spread": 0.0}

    monkeypatch.setattr(cost_additivity, "measure", fake_measure)
    full, cut, rescored = tmp_path / "full.json", tmp_path / "cut.json", tmp_path / "rescored.json"
    monkeypatch.setattr(sys, "argv", ["cost_additivity.py", "--tiny", "--out", str(full)])
    cost_additivity.main()
    whole = json.loads(full.read_text())
    partial = {**whole, "timed": {k: v for k, v in whole["timed"].items() if k not in ("child4", "child5", "child6")}}
    del partial["predictions"], partial["per_variant_s"]
    cut.write_text(json.dumps(partial))
    monkeypatch.setattr(sys, "argv", ["cost_additivity.py", "--tiny", "--rescore", str(cut), "--out", str(rescored)])
    cost_additivity.main()
    again = json.loads(rescored.read_text())
    assert again["rescored"]["models"] == ["parent", "child1", "child2", "child3"]
    for method, result in again["predictions"].items():
        for name, row in result["models"].items():
            assert row == pytest.approx(whole["predictions"][method]["models"][name]), (method, name)
    del partial["timed"]["parent"]
    cut.write_text(json.dumps(partial))
    with pytest.raises(SystemExit, match="lacks the stacks or the parent"):
        cost_additivity.main()
