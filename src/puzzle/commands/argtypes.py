"""argparse value types shared by the subcommands: a bad value is argparse's one-line usage error (exit 2)."""

from __future__ import annotations

import argparse

from puzzle.core.dtypes import dtype_name
from puzzle.core.errors import PuzzleError
from puzzle.formats.export import parse_shard_size


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def shard_size(text: str) -> str:
    """A positive size such as 5GB, 500MB or a byte count (kept as text: export_hf reads it)."""
    try:
        parse_shard_size(text)
    except PuzzleError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def dtype_arg(text: str) -> str:
    """A weight dtype by any of its names (bfloat16 / bf16, float16 / fp16, float32 / fp32): the canonical name."""
    try:
        return dtype_name(text)
    except PuzzleError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
