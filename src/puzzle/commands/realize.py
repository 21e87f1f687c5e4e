"""`puzzle realize RUN_DIR [SOLUTION ...] [--config YAML] [key=value ...]`: build chosen children from library
weights into children/<SOLUTION>/; without names, the run's `realize` config chooses (best per target)."""

from __future__ import annotations

import argparse
from pathlib import Path

from puzzle.core.config import load_stage_config
from puzzle.stages.realize import RealizeConfig, chosen_solutions, run_realize
from puzzle.stages.refine.stage import RefineConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="run directory (reads parent/, library/, search/)")
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML config; its `realize` section goes over RUN_DIR/config.json (saved by `puzzle run`)")
    parser.add_argument("items", nargs="*", metavar="SOLUTION|key=value",
                        help="solution names from search/solutions.json (e.g. child-0) and/or key=value overrides "
                             "(e.g. max_children=2); no names: realize.solutions, else the best of each target")
    parser.add_argument("--refined", action=argparse.BooleanOptionalAction, default=None,
                        help="read refine/solutions.json and use its coupled blocks (default: the run's "
                             "refine.enabled)")


def run(args: argparse.Namespace) -> int:
    names = [item for item in args.items if "=" not in item]
    overrides = [item for item in args.items if "=" in item]
    cfg = load_stage_config(RealizeConfig, args.run_dir, "realize", args.config, overrides)
    refined = args.refined
    if refined is None:
        refined = load_stage_config(RefineConfig, args.run_dir, "refine", args.config).enabled
    for name in names or chosen_solutions(args.run_dir, cfg, refined):
        print(f"realize: {run_realize(args.run_dir, name, refined)}")
    return 0
