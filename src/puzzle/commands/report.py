"""`puzzle report RUN_DIR [--config YAML] [key=value ...]`: report.md and PNG plots from the run's artifacts."""

from __future__ import annotations

import argparse
from pathlib import Path

from puzzle.config import load_config
from puzzle.report import ReportConfig, run_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="run directory (reads eval/, search/, costs/, library/, children/)")
    parser.add_argument("--config", type=Path, default=None, help="YAML config; its `report` section is used")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. workload=chatbot plots=false")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(ReportConfig, args.config, args.overrides, section="report")
    print(f"wrote {run_report(args.run_dir, cfg)}")
    return 0
