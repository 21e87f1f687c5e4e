from __future__ import annotations

import json
from pathlib import Path

import pytest

from gkd_helpers import (
    make_run_dir,
    one_torch_thread,  # noqa: F401  (autouse fixture: one intra-op thread)
)
from puzzle.core.artifacts import write_json
from puzzle.core.errors import PuzzleError
from puzzle.stages.evaluate.stage import EvalConfig, run_eval
from puzzle.stages.report import plots as report_plots
from puzzle.stages.report.stage import ReportConfig, run_report
from puzzle.stages.uptrain.stage import UptrainConfig, run_uptrain

PNG = b"\x89PNG\r\n\x1a\n"


def _costs(run: Path) -> None:
    """costs/<device>-<workload>.json in engineer D's schema: per-layer times of each variant."""
    rec = lambda t: {"prefill_s": t, "decode_step_s": t / 10, "params": 1, "kv_bytes_per_token": 0, "oom": False}
    write_json(run / "costs" / "estimate-batch1.json", {
        "schema": "puzzle-costs/1", "kind": "estimate", "workload": {"name": "batch1", "batch_size": 1,
                                                                     "prompt_len": 8, "gen_len": 4},
        "attention": {"gqa2": rec(2.0), "no_op": rec(0.0)}, "ffn": {"swiglu64": rec(4.0), "no_op": rec(0.0)},
        "fixed": {"prefill_s": 1.0, "decode_step_s": 0.1, "sampling_s": 0.0, "params": 10},
    })


def _solutions(run: Path) -> None:
    """search/solutions.json in engineer C's schema."""
    def sol(name: str, obj: float, tps: float) -> dict:
        return {"name": name, "target": None, "objective": obj, "attention_layers": 2,
                "predicted": {"batch1": {"throughput_tok_s": tps, "speedup": tps / 100}}}
    write_json(run / "search" / "solutions.json", {
        "metric": "kl", "parent": {"batch1": {"throughput_tok_s": 100.0}},
        "solutions": [sol("child-0", 0.2, 150.0), sol("child-1", 0.3, 170.0)],
        "baselines": [{**sol("", 0.6, 150.0), "method": "greedy", "feasible": True},
                      {"method": "max_params", "feasible": False, "target": None}],
    })


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run, _ = make_run_dir(tmp_path_factory.mktemp("report"))
    run_uptrain(run, run / "children" / "noattn12",
                UptrainConfig(steps=3, micro_batch_size=2, val_every=1, val_batches=2, checkpoint_every=0,
                              device="cpu"))
    run_eval(run, EvalConfig(batch_size=8, max_sequences=16, device="cpu"))
    _costs(run)
    _solutions(run)
    return run


def test_report_has_every_section_and_plot(run: Path) -> None:
    if not report_plots.available():
        pytest.skip("matplotlib is not installed")
    text = run_report(run, ReportConfig()).read_text()
    for heading in ("## Quality", "## Search solutions", "## Chosen architectures", "## Global distillation",
                    "## Plots"):
        assert heading in text, heading
    assert "| noattn12/uptrained |" in text and "| child-0 |" in text and "| greedy |" in text
    # the per-layer table: layers 1 and 2 lost their attention, whose cost relative to the parent is 0
    assert "| 1 | no_op | swiglu64 | gqa2+swiglu64 | 0 | 1 |" in text
    assert "| 0 | gqa2 | swiglu64 | gqa2+swiglu64 | 1 | 1 |" in text
    for png in ("quality_vs_throughput.png", "measured_quality.png", "layer_costs-noattn12.png", "gkd_curves.png"):
        path = run / "report" / png
        assert path.read_bytes()[:8] == PNG, png
        assert f"(report/{png})" in text


def test_report_without_matplotlib_still_writes(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report_plots, "available", lambda: False)
    text = run_report(run).read_text()
    assert "plots skipped: matplotlib cannot be imported" in text
    assert "## Plots" not in text and "## Quality" in text


def test_report_tolerates_a_bare_run_dir(tmp_path: Path) -> None:
    text = run_report(tmp_path, ReportConfig(plots=False)).read_text()
    assert "solutions.json not found" in text and "eval.json not found" in text
    with pytest.raises(PuzzleError, match="does not exist"):
        run_report(tmp_path / "missing")


def test_report_cli(run: Path) -> None:
    from puzzle.cli import main

    assert main(["report", str(run), "plots=false"]) == 0
    assert main(["report", str(run), "colour=red"]) == 2
    assert json.loads((run / "eval" / "eval.json").read_text())["models"]["parent"]["agreement"] == 1.0


def test_report_shows_long_context_retention(tmp_path: Path) -> None:
    def lc(acc: dict[str, float], ret: dict[str, float | None] | None) -> dict:
        return {"mean_accuracy": acc, "accuracy": {}, **({"retention_pct": ret} if ret is not None else {})}

    ev = {"split": "test", "sequences": 0, "seq_len": None, "models": {
        "parent": {"params": 10, "long_context": lc({"1024": 0.8, "2048": 0.5}, {"1024": 100.0, "2048": 100.0})},
        "child": {"params": 8, "long_context": lc({"1024": 0.4, "2048": 0.0}, {"1024": 50.0, "2048": 0.0})}},
        "long_context": {"tasks": ["niah_single"], "items": 4, "haystack_split": "test"}}
    write_json(tmp_path / "eval" / "eval.json", ev)
    text = run_report(tmp_path, ReportConfig()).read_text()
    assert "## Long-context retention" in text
    assert "| child | 40.0 (50%) | 0.0 (0%) |" in text
    if report_plots.available():
        assert (tmp_path / "report" / "long_context.png").stat().st_size > 0
    # eval drew the figure: the report copies that file instead of drawing it again
    (tmp_path / "eval" / "long_context.png").write_bytes(b"the figure eval drew")
    write_json(tmp_path / "eval" / "eval.json", {**ev, "long_context": {**ev["long_context"], "plot": "long_context.png"}})
    text = run_report(tmp_path, ReportConfig()).read_text()
    if report_plots.available():
        assert (tmp_path / "report" / "long_context.png").read_bytes() == b"the figure eval drew"
        assert "long_context.png" in text
    assert "| child | 40.0 (50%) | 0.0 (0%) |" in text
