"""The summary's serving lines: per chosen child, the engines that can serve it and what stops the others."""

from __future__ import annotations

from pathlib import Path

from puzzle.core.artifacts import read_json
from puzzle.core.rundir import RunDir
from puzzle.formats.engines import servability_lines
from puzzle.formats.loading import load_model_config
from puzzle.model.blocks import BlockConfig


def serving_lines(run_dir: Path | RunDir) -> list[str]:
    """'child-0 serves with: trtllm, llama.cpp, transformers' and one line per engine that cannot; [] before the
    search (or without an imported parent, whose whole-model settings the answer needs)."""
    run = RunDir(run_dir)
    solutions = run.solutions_in_use()
    if not solutions.exists() or not run.parent.exists():
        return []
    parent = load_model_config(run.parent)
    lines = []
    for sol in read_json(solutions).get("solutions", []):
        child = parent.with_blocks([BlockConfig.from_dict(b) for b in sol["blocks"]])
        first, *rest = servability_lines(child)
        lines += [f"{sol['name']} {first}", *(f"  {line}" for line in rest)]
    return lines
