"""Search targets as users write them, read into base units.

    {kind: throughput, target: "2x", workload: text-generation}   2x the parent's tokens/s (or "1500" tok/s)
    {kind: latency, target: "1.5s", workload: chatbot}            whole-workload time (ttft: time to first token)
    {kind: memory, target: "80GiB", workload: summarization}      weights + KV cache for that workload (per
                                                                  GPU when it is tensor-parallel)
    {kind: params, target: "7B"}                                  parameter budget
    {kind: min_attention_layers, target: 8}                       at least 8 layers keep GQA attention
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from puzzle.core.errors import PuzzleError

ConstraintKind = Literal["throughput", "latency", "ttft", "memory", "params", "min_attention_layers"]
NEEDS_WORKLOAD = {"throughput", "latency", "ttft", "memory"}


@dataclass
class ConstraintSpec:
    kind: ConstraintKind
    target: str  # "2x", "1500", "1.5s", "200ms", "80GiB", "7B", "8"
    workload: str | None = None  # named workload (throughput, latency, ttft, memory)


def check_target(where: str, kind: str, text: str) -> None:
    """A constraint target that parses for its kind and is positive (a count of layers may be 0)."""
    try:
        value, _ = parse_target(kind, text)
    except PuzzleError as e:
        raise PuzzleError(f"{where}: {e}") from None
    if value <= 0 and kind != "min_attention_layers":
        raise PuzzleError(f"{where}: a {kind} target must be positive, got {text!r}")


_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_COUNT = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def _parse(text: str, pattern: str, what: str, example: str) -> re.Match[str]:
    m = re.fullmatch(pattern, str(text).strip().lower().replace(" ", ""))
    if m is None:
        raise PuzzleError(f"cannot read {what} target {text!r}; write it like {example}")
    return m


def parse_target(kind: str, text: str) -> tuple[float, bool]:
    """-> (value in base units: tok/s, s, bytes, params, layers; whether it is a factor of the parent's)."""
    num = r"(\d+(?:\.\d*)?(?:e[+-]?\d+)?)"
    if kind == "throughput":
        m = _parse(text, num + r"(x|tok/s|tokens/s)?", "throughput", '"2x" (of the parent) or "1500" (tokens/s)')
        return float(m[1]), m[2] == "x"
    if kind in ("latency", "ttft"):
        m = _parse(text, num + r"(s|ms)?", kind, '"1.5s" or "200ms"')
        return float(m[1]) * (1e-3 if m[2] == "ms" else 1.0), False
    if kind == "memory":
        m = _parse(text, num + r"(b|kb|mb|gb|tb|kib|mib|gib|tib)?", "memory", '"80GiB" or "24GB"')
        return float(m[1]) * _UNITS[m[2] or ""], False
    if kind == "params":
        m = _parse(text, num + r"([kmbgt])?", "params", '"7B" or "500M"')
        return float(m[1]) * _COUNT[m[2] or ""], False
    if kind == "min_attention_layers":
        m = _parse(text, r"(\d+)", "min_attention_layers", '"8"')
        return float(m[1]), False
    raise PuzzleError(f"unknown constraint kind {kind!r}; use throughput, latency, ttft, memory, params "
                      "or min_attention_layers")
