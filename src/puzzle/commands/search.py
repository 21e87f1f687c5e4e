"""`puzzle search RUN_DIR [--config YAML] [key=value ...]`: the MIP over scores and costs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from puzzle.core.config import load_stage_config
from puzzle.stages.search.stage import SearchConfig, run_search


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="run directory (reads scores/ and costs/; writes search/)")
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML config; its `search` section goes over RUN_DIR/config.json (saved by `puzzle run`)")
    parser.add_argument("overrides", nargs="*",
                        help='key=value, e.g. \'constraints=[{kind: throughput, target: 2x, workload: chatbot}]\' '
                             'sweep=[1.5x,2x,2.5x] num_solutions=3')


def run(args: argparse.Namespace) -> int:
    cfg = load_stage_config(SearchConfig, args.run_dir, "search", args.config, args.overrides)
    path = run_search(args.run_dir, cfg)
    result = json.loads(path.read_text())
    for sol in result["solutions"]:
        speedups = ", ".join(f"{w} {p['speedup']:.2f}x{' (ESTIMATE)' if p.get('estimate') else ''}"
                             for w, p in sol["predicted"].items())
        print(f"{sol['name']}: {result['metric']} {sol['objective']:.4g}; {speedups}")
    for item in result["infeasible"]:
        print(f"target {item['target']}: {item['message']}")
    print(f"search: {path}")
    return 0
