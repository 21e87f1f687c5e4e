"""`puzzle realize RUN_DIR SOLUTION`: build a chosen child from library weights into children/<SOLUTION>/."""

from __future__ import annotations

import argparse
from pathlib import Path

from puzzle.realize import run_realize


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="run directory (reads parent/, library/, search/)")
    parser.add_argument("solution", help="a solution name from search/solutions.json, e.g. child-0")


def run(args: argparse.Namespace) -> int:
    out = run_realize(args.run_dir, args.solution)
    print(f"realize: {out}")
    return 0
