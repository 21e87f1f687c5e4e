"""`puzzle inspect [PATH] [--json]`: per-layer table and totals; reads the config only (meta device)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from puzzle.formats import detect_format, load_model_config
from puzzle.formats.engines import servability_json, servability_lines
from puzzle.formats.gguf import config_from_reader, gguf_summary, open_gguf
from puzzle.model.inspection import format_report, inspect_config
from puzzle.model.presets import tiny_llama_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", nargs="?", default=None,
                        help="model directory, llama.cpp .gguf, llama2.c .bin, or config.json "
                             "(default: a small built-in model)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _architecture(fmt: str, source_architecture: str) -> str:
    """The class the files are: a Nemotron-NAS child is DeciLMForCausalLM whatever its parent was; a native
    directory has no HF class, only the parent's."""
    if fmt == "nemotron-nas":
        return "DeciLMForCausalLM"
    return f"from {source_architecture}" if fmt == "native" else source_architecture


def run(args: argparse.Namespace) -> int:
    if args.path is None:
        config, title, fmt = tiny_llama_config(), "built-in tiny Llama (random weights; pass a PATH to inspect yours)", "builtin"
        stored: dict[str, Any] = {}
    else:
        fmt = detect_format(args.path)
        if fmt == "gguf":  # one parse of the file gives the config and what it stores
            reader = open_gguf(args.path)
            config, stored = config_from_reader(reader, Path(args.path)), gguf_summary(reader, args.path)
        else:
            config, stored = load_model_config(args.path), {}
        title = f"{args.path} ({fmt}, {_architecture(fmt, config.source_architecture)})"
    report = {**inspect_config(config), **stored}
    if fmt == "gguf":  # what the file stores: its architecture and the tensor types that will be dequantized
        types = ", ".join(f"{n} x{k}" for n, k in report["gguf_tensor_types"].items())
        title += f"; GGUF architecture {report['gguf_architecture']}, tensor types {types}"
    if args.json:
        print(json.dumps({"path": args.path, "format": fmt, "config": config.to_dict(), **report,
                          "engines": servability_json(config)}, indent=2))
    else:
        print(format_report(title, config, report))
        print("\n".join(f"  {line}" for line in servability_lines(config)))
    return 0
