"""`puzzle score RUN_DIR [--config YAML] [key=value ...]`: replace-1-block scoring of every library candidate."""

from __future__ import annotations

import argparse
from pathlib import Path

from puzzle.config import load_config
from puzzle.scoring import ScoreConfig, run_score


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="run directory (reads parent/, library/, data/; writes scores/)")
    parser.add_argument("--config", type=Path, default=None, help="YAML config; its `score` section is used")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. num_sequences=32 task_file=tasks.jsonl")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(ScoreConfig, args.config, args.overrides, section="score")
    path = run_score(args.run_dir, cfg)
    print(f"score: {path}")
    return 0
