"""The `puzzle` command: one subcommand per stage, plus run, demo, inspect, generate and bench.

Each subcommand lives in its own module under `puzzle.commands` and defines
    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int
Modules are imported only when their subcommand runs, so `puzzle --help` stays fast.
A `PuzzleError` becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from puzzle import __version__
from puzzle.core.errors import PuzzleError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("puzzle.commands.run", "run the whole pipeline from a YAML config (stages skip when current)"),
    "demo": ("puzzle.commands.demo", "train a tiny parent on the standard library's text and run the pipeline on CPU"),
    "import": ("puzzle.commands.import_", "read a parent model into the run directory"),
    "data": ("puzzle.commands.data", "tokenize and pack calibration text"),
    "library": ("puzzle.commands.library", "blockwise local distillation of every candidate sub-block"),
    "score": ("puzzle.commands.score", "replace-1-block scoring of every candidate"),
    "costs": ("puzzle.commands.costs", "measure every candidate's cost on this device"),
    "search": ("puzzle.commands.search", "choose one block per layer with a mixed-integer programme"),
    "refine": ("puzzle.commands.refine", "coupled BLD of the blocks the search chose, re-scored and re-searched"),
    "realize": ("puzzle.commands.realize", "assemble a chosen child from library weights"),
    "uptrain": ("puzzle.commands.uptrain", "global knowledge distillation of a child from its parent"),
    "eval": ("puzzle.commands.eval", "quality and throughput of parent and children"),
    "report": ("puzzle.commands.report", "plots and report.md"),
    "inspect": ("puzzle.commands.inspect", "per-layer table of a model, llama2.c file or config.json"),
    "export": ("puzzle.commands.export", "write a model as a Hugging Face directory"),
    "generate": ("puzzle.commands.generate", "generate text from a model, streaming tokens"),
    "bench": ("puzzle.commands.bench", "throughput and latency of one or more models on named workloads"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="puzzle", description="Make a pretrained LLM faster on its target GPU.")
    parser.add_argument("--version", action="version", version=f"puzzle {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


def command_parser(name: str) -> argparse.ArgumentParser:
    module, help_text = COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"puzzle {name}", description=help_text)
    importlib.import_module(module).add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    # A torchrun worker whose gloo process group outlived its teardown must not finalize the interpreter.
    dist_module = sys.modules.get("puzzle.core.distributed")  # imported only by commands that start a process group
    return dist_module.finish_process(code) if dist_module is not None else code


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    try:
        if command is None:
            parser = build_parser()
            parser.parse_args(argv)  # handles --help and reports an unknown command
            parser.print_help()
            return 2
        # Intermixed parsing lets `key=value` overrides come before or after options.
        args = command_parser(command).parse_intermixed_args(argv[1:])
        args.command = command
        return int(importlib.import_module(COMMANDS[command][0]).run(args) or 0)
    except PuzzleError as e:
        print(f"puzzle {command or ''}: error: {e}".replace("  ", " "), file=sys.stderr)
        return e.exit_code
    except ModuleNotFoundError as e:
        if command and e.name == COMMANDS[command][0]:
            print(f"puzzle: error: '{command}' is not available in this version", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("puzzle: interrupted; finished work is kept, rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
