"""`puzzle score RUN_DIR [--config YAML] [key=value ...]`: replace-1-block scoring of every library candidate."""

from __future__ import annotations

import argparse
from pathlib import Path

from puzzle.core.config import load_stage_config
from puzzle.stages.scoring.stage import ScoreConfig, run_score


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="run directory (reads parent/, library/, data/; writes scores/)")
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML config; its `score` section goes over RUN_DIR/config.json (saved by `puzzle run`)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. num_sequences=32 task_file=tasks.jsonl")


def run(args: argparse.Namespace) -> int:
    cfg = load_stage_config(ScoreConfig, args.run_dir, "score", args.config, args.overrides)
    path = run_score(args.run_dir, cfg)
    print(f"score: {path}")
    return 0
