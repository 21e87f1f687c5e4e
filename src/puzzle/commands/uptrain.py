"""`puzzle uptrain RUN_DIR [--child NAME ...] [--config YAML] [key=value ...]`: GKD of children from the parent.

Distributed: `torchrun --nproc-per-node N -m puzzle.cli uptrain RUN_DIR ...` (FSDP2 for large children).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from puzzle.core.config import load_stage_config
from puzzle.core.errors import PuzzleError
from puzzle.core.rundir import RunDir
from puzzle.stages.uptrain.stage import UptrainConfig, run_uptrain


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="run directory (reads parent/, data/, children/<name>/)")
    parser.add_argument("--child", action="append", default=None,
                        help="child name under children/ (repeatable); default: every realized child")
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML config; its `uptrain` section goes over RUN_DIR/config.json (saved by `puzzle run`)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. steps=500 lr=5e-5 lm_weight=0.5")


def children(run_dir: Path, names: list[str] | None) -> list[Path]:
    run = RunDir(run_dir)
    if names:
        return [run.child(n) for n in names]
    found = [p for p in run.child_dirs() if RunDir.model_config(p).exists()]
    if not found:
        raise PuzzleError(f"no realized children in {run.children}; run `puzzle realize {run_dir}` first")
    return found


def run(args: argparse.Namespace) -> int:
    cfg = load_stage_config(UptrainConfig, args.run_dir, "uptrain", args.config, args.overrides)
    for child_dir in children(args.run_dir, args.child):
        run_uptrain(args.run_dir, child_dir, cfg)  # says per child whether it wrote or was current
    return 0
