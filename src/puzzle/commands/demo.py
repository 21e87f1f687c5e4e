"""`puzzle demo`: the whole pipeline on CPU in minutes, with nothing but this package.

Without arguments it builds a tiny parent from the Python standard library's own text, then runs
import -> ... -> report with the embedded config `puzzle/configs/demo.yaml`. With `--parent PATH --data PATH`
it runs the same small pipeline on a user's model and text.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

import yaml

from puzzle.core.config import apply_overrides
from puzzle.core.errors import PuzzleError
from puzzle.demo.parent import build_demo_parent
from puzzle.demo.pretrain import PretrainConfig
from puzzle.pipeline import load_run_config, run_pipeline
from puzzle.stages.report.summary import print_summary


def demo_config_text() -> str:
    return resources.files("puzzle").joinpath("configs/demo.yaml").read_text()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="where everything is written")
    parser.add_argument("--parent", default=None, help="your own parent model instead of the built-in one")
    parser.add_argument("--data", default=None, help="your own text (file or folder) for calibration")
    parser.add_argument("--pretrain-steps", type=int, default=PretrainConfig.steps,
                        help="optimizer steps for the built-in parent")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the demo config")


def run(args: argparse.Namespace) -> int:
    if (args.parent is None) != (args.data is None):
        raise PuzzleError("--parent and --data go together: your model and the text to calibrate and distil on")
    data = yaml.safe_load(demo_config_text())
    if args.parent is None:
        parent, corpus = build_demo_parent(args.out, PretrainConfig(steps=args.pretrain_steps))
        data["parent"], data["data"]["sources"] = str(parent), [str(corpus)]
    else:
        data["parent"] = args.parent
        data["data"]["sources"] = [args.data]
    data["run_dir"] = str(args.out / "run")
    cfg = load_run_config(apply_overrides(data, args.overrides))
    run_pipeline(cfg)
    print_summary(Path(cfg.run_dir))
    return 0
