"""`puzzle refine RUN_DIR [--config YAML] [key=value ...]`: coupled BLD of the blocks the search chose, re-scored
and re-searched (refine/). Opt-in: it does nothing unless refine.enabled is true (in RUN_DIR/config.json, the
YAML, or `enabled=true` here). The BLD settings are the run's `library` section; the search's are `search`.

Distributed: `torchrun --nproc-per-node N -m puzzle.cli refine RUN_DIR ...` splits the training over the ranks.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from puzzle.core.config import load_stage_config
from puzzle.stages.library import LibraryConfig
from puzzle.stages.refine.stage import RefineConfig, run_refine
from puzzle.stages.search.stage import SearchConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path,
                        help="run directory (reads search/, scores/, library/, parent/, data/, costs/; writes refine/)")
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML config; its `refine`, `library` and `search` sections go over RUN_DIR/config.json")
    parser.add_argument("overrides", nargs="*", help="refine key=value, e.g. enabled=true tokens_per_variant=1000000")


def run(args: argparse.Namespace) -> int:
    cfg = load_stage_config(RefineConfig, args.run_dir, "refine", args.config, args.overrides)
    if not cfg.enabled:
        print("refine: refine.enabled is false, nothing to do; pass enabled=true (and realize with --refined)")
        return 0
    library = load_stage_config(LibraryConfig, args.run_dir, "library", args.config)
    search = load_stage_config(SearchConfig, args.run_dir, "search", args.config)
    print(f"refine: {run_refine(args.run_dir, cfg, library, search)}")
    return 0
