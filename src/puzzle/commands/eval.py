"""`puzzle eval RUN_DIR [--config YAML] [key=value ...]`: parent and children side by side -> eval/eval.json."""

from __future__ import annotations

import argparse
from pathlib import Path

from puzzle.core.config import load_stage_config
from puzzle.core.rundir import RunDir
from puzzle.core.workloads import run_workloads
from puzzle.stages.evaluate.long_context_eval import long_context_table
from puzzle.stages.evaluate.stage import EvalConfig, run_eval
from puzzle.stages.evaluate.tables import heldout_table, task_table
from puzzle.stages.evaluate.tasks import TaskSpec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="run directory (reads parent/, data/, children/)")
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML config; its `eval` section goes over RUN_DIR/config.json (saved by `puzzle run`)")
    parser.add_argument("--task", action="append", default=[], metavar="PATH",
                        help="task file (HellaSwag .txt[.bz2], LAMBADA .jsonl, or context/choices/gold .jsonl)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. task_limit=500 children=[a,b]")


def run(args: argparse.Namespace) -> int:
    cfg = load_stage_config(EvalConfig, args.run_dir, "eval", args.config, args.overrides)
    if args.task:
        cfg.tasks = [*cfg.tasks, *(TaskSpec(path=p) for p in args.task)]
    result = run_eval(args.run_dir, cfg, run_workloads(args.run_dir, args.config))
    print(heldout_table(result))
    for table in (task_table(result["models"]), long_context_table(result["models"])):
        if table:
            print(table)
    print(f"wrote {RunDir(args.run_dir).eval_file}")
    return 0
