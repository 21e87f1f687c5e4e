"""Whether refine/ is current: what realize checks before it reads refine/solutions.json (kept light: realize
and the CLI import it without the refine stage's training and search modules)."""

from __future__ import annotations

from pathlib import Path

from puzzle.core.artifacts import STAMP, hash_paths, read_json
from puzzle.core.errors import PuzzleError
from puzzle.core.rundir import RunDir


def source_hash(run: RunDir) -> str:
    """What the refinement was built from; realize checks it to know refine/ is current."""
    return hash_paths([run.solutions, run.scores_file, run.library_index])


def refined_solutions(run_dir: Path | RunDir) -> Path:
    """refine/solutions.json, checked to come from the current search, scores and library."""
    run = RunDir(run_dir)
    stamp = run.refine / STAMP
    if not run.refine_solutions.exists() or not stamp.exists() or \
            read_json(stamp).get("source") != source_hash(run):
        raise PuzzleError(f"refine.enabled is set but {run.refine_solutions} is missing or older than search/, "
                          f"scores/ or library/; run `puzzle refine {run.root}` (or set refine.enabled=false)")
    return run.refine_solutions

