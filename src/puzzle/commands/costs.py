"""`puzzle costs RUN_DIR [--config YAML] [key=value ...]`: per-sub-block costs on this device."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory (reads parent/ and library/, writes costs/)")
    parser.add_argument("--config", default=None,
                        help="YAML config; its `costs` section goes over RUN_DIR/config.json (saved by `puzzle run`)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. mode=estimate repeats=20")


def run(args: argparse.Namespace) -> int:
    from puzzle.core.config import load_stage_config
    from puzzle.costs.stage import CostsConfig, run_costs

    cfg = load_stage_config(CostsConfig, args.run_dir, "costs", args.config, args.overrides)
    for name, path in run_costs(Path(args.run_dir), cfg).items():
        print(f"{name}: {path}")
    return 0
