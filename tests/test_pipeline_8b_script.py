"""benchmarks/pipeline_8b.py end to end at its tiny shape on CPU: every stage timed, split over two calls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_helpers import write_corpus
from puzzle.pipeline import STAGES

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "pipeline_8b.py"


def _run(tmp: Path, out: Path, *extra: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--shape", "tiny", "--data", str(tmp / "corpus"),
                           "--work", str(tmp / "work"), "--out", str(out), "--uptrain-steps", "3", *extra],
                          check=False, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_tiny_pipeline_records_every_stage_and_the_projection(tmp_path: Path) -> None:
    write_corpus(tmp_path / "corpus")
    out = tmp_path / "result.json"
    _run(tmp_path, out, "--until", "library")
    first = json.loads(out.read_text())
    assert [r["stage"] for r in first["stages"]] == list(STAGES[:3])
    table = _run(tmp_path, out, "--from", "score")  # the rows of the first call are kept
    result = json.loads(out.read_text())

    rows = {r["stage"]: r for r in result["stages"]}
    assert list(rows) == list(STAGES)
    assert rows["library"] == first["stages"][2]
    assert all(r["wall_s"] >= 0 for r in rows.values())
    for stage in ("data", "library", "score", "uptrain", "eval"):
        assert rows[stage]["tokens"] > 0 and rows[stage]["tokens_per_s"] > 0, rows[stage]
    lib = rows["library"]
    assert lib["trained_variants"] > 0 and lib["tokens"] == 2048 and lib["param_tokens"] > 0
    assert rows["uptrain"]["steps"] == 3 and rows["uptrain"]["tokens"] == 3 * 4 * 32
    assert rows["eval"]["models"] == 3  # parent, child, uptrained child
    assert rows["score"]["candidates"] > 0
    parent = result["parent"]
    assert parent["num_hidden_layers"] == 3 and parent["reused"] and parent["params"] > 0
    assert result["child_params"] and result["child_params"] < parent["params"]
    assert {"date", "machine", "command", "git_commit"} <= set(result["meta"])

    proj = result["projection_70b_8gpu"]
    assert [r["stage"] for r in proj["stages"]] == list(STAGES)
    assert proj["inputs"]["P8"] == parent["params"] and proj["inputs"]["ranks"] == 8
    assert "t70 = t8 * r" in proj["formula"]
    lib70 = next(r for r in proj["stages"] if r["stage"] == "library")
    assert lib70["wall_s"] == round(lib["wall_s"] * lib70["factor"], 1)
    assert "| stage | wall s | tokens | tokens/s |" in table and "projection: Llama-3.1-70B" in table


def test_a_failing_stage_is_recorded_and_the_measured_ones_kept(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import pipeline_8b

    real = pipeline_8b.run_pipeline

    def run(cfg: object, start: str | None = None, until: str | None = None) -> object:
        if start == "score":
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(cfg, start=start, until=until, log=lambda msg: None)

    monkeypatch.setattr(pipeline_8b, "run_pipeline", run)
    write_corpus(tmp_path / "corpus")
    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["pipeline_8b.py", "--shape", "tiny", "--data", str(tmp_path / "corpus"),
                                      "--work", str(tmp_path / "work"), "--out", str(out), "--until", "costs"])
    assert pipeline_8b.main() == 1
    rows = json.loads(out.read_text())["stages"]
    assert [r["stage"] for r in rows] == ["import", "data", "library", "score"]
    assert "out of memory" in rows[-1]["error"] and "wall_s" not in rows[-1]
    assert json.loads(out.read_text())["projection_70b_8gpu"]["stages"][-1]["error"]


def test_a_stage_stopped_by_a_time_limit_adds_both_calls_times(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`timeout` stops a call mid-stage (SIGTERM); the next call's --from finishes the stage, whose wall time is
    the two parts together, not only the second (which would hide the first call's work)."""
    import signal
    import time

    sys.path.insert(0, str(REPO / "benchmarks"))
    import pipeline_8b

    real = pipeline_8b.run_pipeline
    stop_once = {"library"}

    def run(cfg: object, start: str | None = None, until: str | None = None) -> object:
        if start in stop_once:
            stop_once.clear()
            time.sleep(0.3)
            signal.raise_signal(signal.SIGTERM)
        return real(cfg, start=start, until=until, log=lambda msg: None)

    monkeypatch.setattr(pipeline_8b, "run_pipeline", run)
    write_corpus(tmp_path / "corpus")
    out = tmp_path / "r.json"
    argv = ["pipeline_8b.py", "--shape", "tiny", "--data", str(tmp_path / "corpus"), "--work", str(tmp_path / "work"),
            "--out", str(out), "--uptrain-steps", "2", "--until", "score"]
    previous = signal.getsignal(signal.SIGTERM)
    try:
        monkeypatch.setattr(sys, "argv", argv)
        assert pipeline_8b.main() == 1
        stopped = {r["stage"]: r for r in json.loads(out.read_text())["stages"]}["library"]
        assert stopped["interrupted_after_s"] >= 0.3 and "wall_s" not in stopped
        table = pipeline_8b.stage_table(json.loads(out.read_text()))
        assert "stopped after" in table
        monkeypatch.setattr(sys, "argv", [*argv, "--from", "library"])
        assert pipeline_8b.main() == 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    library = {r["stage"]: r for r in json.loads(out.read_text())["stages"]}["library"]
    first, second = library["calls_wall_s"]
    assert first == stopped["interrupted_after_s"] and library["wall_s"] == round(first + second, 2)
    assert library["tokens_per_s"] == round(library["tokens"] / library["wall_s"], 1)


def test_projection_efficiencies_come_from_the_measured_files(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import _pipeline_projection as proj

    e, source = proj.fsdp_efficiency(tmp_path)  # nothing measured: the stated assumption
    assert e == proj.FSDP_EFFICIENCY and "assumed" in source
    d = tmp_path / proj.DISTRIBUTED
    d.mkdir()
    (d / "gkd_8b_1gpu.json").write_text(json.dumps({"tokens_per_s": 1000.0}))
    (d / "gkd_8b_fsdp2.json").write_text(json.dumps({"tokens_per_s": 1500.0}))
    assert proj.fsdp_efficiency(tmp_path)[0] == 0.75
    for n, wall in ((1, 20.0), (2, 12.5)):
        (d / f"bld_8b_{n}gpu.json").write_text(json.dumps({"results": [{"model": "llama8b",
                                                                         "fused": {"wall_s": wall}}]}))
    e_bld, source = proj.bld_efficiency(tmp_path)
    assert e_bld == 0.8 and "bld_8b_2gpu.json" in source
