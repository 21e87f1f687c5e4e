"""`puzzle run CONFIG.yaml [key=value ...] [--from STAGE] [--until STAGE]`: the whole pipeline.

Under `torchrun --nproc-per-node N $(which puzzle) run ...` the distributed stages use every rank.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from puzzle.core.config import apply_overrides, read_yaml
from puzzle.pipeline import STAGES, load_run_config, run_pipeline
from puzzle.stages.report.summary import print_summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run_dir=runs/x library.batch_size=4")
    parser.add_argument("--from", dest="start", choices=STAGES, default=None, help="first stage to run")
    parser.add_argument("--until", choices=STAGES, default=None, help="last stage to run")


def run(args: argparse.Namespace) -> int:
    cfg = load_run_config(apply_overrides(read_yaml(args.config), args.overrides))
    run_pipeline(cfg, start=args.start, until=args.until)
    print_summary(Path(cfg.run_dir))
    return 0
