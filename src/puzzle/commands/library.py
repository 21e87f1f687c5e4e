"""`puzzle library RUN_DIR [--config YAML] [key=value ...]`: blockwise local distillation of every candidate.

Distributed: `torchrun --nproc-per-node N -m puzzle.cli library RUN_DIR ...` (or the `puzzle` script path).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from puzzle.core.config import load_stage_config
from puzzle.stages.library import LibraryConfig, run_library


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="run directory (reads parent/ and data/, writes library/)")
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML config; its `library` section goes over RUN_DIR/config.json (saved by `puzzle run`)")
    parser.add_argument("overrides", nargs="*",
                        help="key=value, e.g. tokens_per_variant=1000000 search_space.ffn_fractions=[1.0,0.5]")


def run(args: argparse.Namespace) -> int:
    cfg = load_stage_config(LibraryConfig, args.run_dir, "library", args.config, args.overrides)
    run_library(args.run_dir, cfg)
    return 0
