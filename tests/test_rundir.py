"""RunDir names every artifact path once; stages and the CLI agree on it."""

from pathlib import Path

from puzzle.core.rundir import RunDir


def test_rundir_paths_are_under_the_root_and_distinct(tmp_path):
    run = RunDir(tmp_path / "r")
    paths = [run.config, run.warnings, run.parent, run.data_manifest, run.data_split("test"), run.library_index,
             run.scores_file, run.costs_file("nvidia-h200", "chatbot"), run.solutions, run.verify,
             run.uptrained("c1"), run.eval_file, run.report, run.plots]
    assert all(Path(p).is_relative_to(tmp_path / "r") for p in paths)
    assert len(set(paths)) == len(paths)
    assert run.costs_file("nvidia-h200", "chatbot").name == "nvidia-h200-chatbot.json"
    assert Path(run) == tmp_path / "r" and RunDir(str(tmp_path / "r")) == run
