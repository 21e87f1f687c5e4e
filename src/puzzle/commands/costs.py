"""`puzzle costs RUN_DIR [--config YAML] [key=value ...]`: per-sub-block costs on this device.

The workloads timed are the run's (a YAML config's top-level `workloads:`, else RUN_DIR/config.json's, else the
built-in ones).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from puzzle.core.config import load_stage_config
from puzzle.core.workloads import run_workloads
from puzzle.costs.stage import CostsConfig, run_costs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory (reads parent/ and library/, writes costs/)")
    parser.add_argument("--config", default=None,
                        help="YAML config; its `costs` section goes over RUN_DIR/config.json (saved by `puzzle run`)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. mode=estimate repeats=20")


def run(args: argparse.Namespace) -> int:
    cfg = load_stage_config(CostsConfig, args.run_dir, "costs", args.config, args.overrides)
    for name, path in run_costs(Path(args.run_dir), cfg, run_workloads(args.run_dir, args.config)).items():
        print(f"{name}: {path}")
    return 0
