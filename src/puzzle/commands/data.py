"""`puzzle data RUN_DIR [--config YAML] [--tokenizer PATH] [key=value ...]`: tokenize and pack calibration text."""

from __future__ import annotations

import argparse
from pathlib import Path

from puzzle.core.config import load_stage_config
from puzzle.stages.data import DataConfig, run_data


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="run directory (writes RUN_DIR/data)")
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML config; its `data` section goes over RUN_DIR/config.json (saved by `puzzle run`)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer (model dir, tokenizer file, llama2.c tok*.bin); default RUN_DIR/parent")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. sources=[books/] seq_len=512")


def run(args: argparse.Namespace) -> int:
    cfg = load_stage_config(DataConfig, args.run_dir, "data", args.config, args.overrides)
    run_data(args.run_dir, cfg, tokenizer_path=args.tokenizer)
    return 0
