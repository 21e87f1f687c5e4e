"""`puzzle eval RUN_DIR [--config YAML] [key=value ...]`: parent and children side by side -> eval/eval.json."""

from __future__ import annotations

import argparse
from pathlib import Path

from puzzle.core.config import load_stage_config
from puzzle.core.rundir import RunDir
from puzzle.core.workloads import run_workloads
from puzzle.stages.evaluate.lm_harness import LmEvalConfig
from puzzle.stages.evaluate.long_context_eval import long_context_table
from puzzle.stages.evaluate.stage import EvalConfig, run_eval
from puzzle.stages.evaluate.tables import heldout_table, task_table
from puzzle.stages.evaluate.tasks import TaskSpec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="run directory (reads parent/, data/, children/)")
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML config; its `eval` section goes over RUN_DIR/config.json (saved by `puzzle run`)")
    parser.add_argument("--task", action="append", default=[], metavar="PATH",
                        help="task file: HellaSwag .txt[.bz2], LAMBADA .jsonl, context/choices/gold .jsonl, or a layout "
                             "of docs/tasks.md (lm-eval / HF field names, MMLU .csv)")
    parser.add_argument("--lm-eval", action="append", default=[], metavar="TASKS",
                        help="lm-evaluation-harness tasks (comma-separated), run in-process and offline on each model")
    parser.add_argument("--lm-eval-include", default=None, metavar="DIR",
                        help="a directory of lm-eval task YAMLs (e.g. dataset_path: json + data_files)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. task_limit=500 children=[a,b]")


def run(args: argparse.Namespace) -> int:
    cfg = load_stage_config(EvalConfig, args.run_dir, "eval", args.config, args.overrides)
    if args.task:
        cfg.tasks = [*cfg.tasks, *(TaskSpec(path=p) for p in args.task)]
    if args.lm_eval or args.lm_eval_include:
        lm = cfg.lm_eval or LmEvalConfig()
        tasks = [t for arg in args.lm_eval for t in arg.split(",") if t]
        cfg.lm_eval = LmEvalConfig(**{**vars(lm), "tasks": [*lm.tasks, *tasks],
                                      "include_path": args.lm_eval_include or lm.include_path})
    result = run_eval(args.run_dir, cfg, run_workloads(args.run_dir, args.config))
    print(heldout_table(result))
    for table in (task_table(result["models"]), long_context_table(result["models"])):
        if table:
            print(table)
    print(f"wrote {RunDir(args.run_dir).eval_file}")
    return 0
