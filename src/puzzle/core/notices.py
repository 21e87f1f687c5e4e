"""Warnings a run must not hide: each is printed once to stderr and kept in `RUN/warnings.json`.

A stage that falls back to something weaker than asked (an uncalibrated cost model, a dynamic-cache
baseline, a missing tokenizer) calls `warn(run_dir, stage, message)`; the summary printed at the end of
`puzzle run` and the report list every kept warning, so a fallback is never visible only inside a JSON file.
A stage that runs again starts from a clean slate with `clear_warnings(run_dir, stage)`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from puzzle.core.artifacts import read_json, write_json
from puzzle.core.rundir import RunDir


def read_warnings(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every kept warning: [{"stage": ..., "message": ...}] in the order they were raised."""
    path = RunDir(run_dir).warnings
    return list(read_json(path).get("warnings", [])) if path.exists() else []


def warn(run_dir: str | Path | None, stage: str, message: str) -> None:
    """Print `warning (stage): message` and keep it in the run directory (when there is one); no duplicates."""
    print(f"warning ({stage}): {message}", file=sys.stderr, flush=True)
    if run_dir is None:
        return
    kept = read_warnings(run_dir)
    entry = {"stage": stage, "message": message}
    if entry not in kept:
        write_json(RunDir(run_dir).warnings, {"warnings": [*kept, entry]})


def clear_warnings(run_dir: str | Path, stage: str) -> None:
    """Forget the warnings a stage raised before it runs again."""
    path = RunDir(run_dir).warnings
    kept = read_warnings(run_dir)
    rest = [w for w in kept if w.get("stage") != stage]
    if rest != kept:
        write_json(path, {"warnings": rest})
