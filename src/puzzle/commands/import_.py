"""`puzzle import RUN_DIR PARENT_PATH`: the parent in native form under RUN_DIR/parent/ (skipped when current)."""

from __future__ import annotations

import argparse
from pathlib import Path

from puzzle.stages.importer import run_import


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory")
    parser.add_argument("parent_path", help="HF Llama/Mistral/Qwen2 dir, Nemotron-NAS dir, native dir, llama.cpp .gguf "
                        "or llama2.c .bin")


def run(args: argparse.Namespace) -> int:
    print(run_import(Path(args.run_dir), args.parent_path))
    return 0
