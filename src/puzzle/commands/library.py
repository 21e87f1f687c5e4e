"""`puzzle library RUN_DIR [--config YAML] [key=value ...]`: blockwise local distillation of every candidate.

Distributed: `torchrun --nproc-per-node N -m puzzle.cli library RUN_DIR ...` (or the `puzzle` script path).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from puzzle.config import load_config
from puzzle.library import LibraryConfig, run_library


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="run directory (reads parent/ and data/, writes library/)")
    parser.add_argument("--config", type=Path, default=None, help="YAML config; its `library` section is used")
    parser.add_argument("overrides", nargs="*",
                        help="key=value, e.g. tokens_per_variant=1000000 search_space.ffn_fractions=[1.0,0.5]")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(LibraryConfig, args.config, args.overrides, section="library")
    run_library(args.run_dir, cfg)
    return 0
