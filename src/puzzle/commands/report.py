"""`puzzle report RUN_DIR [--config YAML] [key=value ...]`: report.md and PNG plots from the run's artifacts."""

from __future__ import annotations

import argparse
from pathlib import Path

from puzzle.core.config import load_stage_config
from puzzle.core.rundir import RunDir
from puzzle.stages.report.stage import ReportConfig, run_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="run directory (reads eval/, search/, costs/, library/, children/)")
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML config; its `report` section goes over RUN_DIR/config.json (saved by `puzzle run`)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. workload=chatbot plots=false")


def run(args: argparse.Namespace) -> int:
    cfg = load_stage_config(ReportConfig, args.run_dir, "report", args.config, args.overrides)
    print(f"wrote {run_report(args.run_dir, cfg)}")
    plots = sorted(RunDir(args.run_dir).plots.glob("*.png"))
    print(f"plots: {RunDir(args.run_dir).plots}/ ({', '.join(p.name for p in plots)})" if plots
          else "plots: none (the report's notes say why)")
    return 0
