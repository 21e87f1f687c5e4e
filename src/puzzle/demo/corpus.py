"""The demo's calibration corpus: the Python standard library's own source and docstrings.

Every Python installation carries it, so the demo needs no network and no `../shared/`.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from puzzle.core.artifacts import atomic_dir
from puzzle.core.errors import PuzzleError


def stdlib_sources(max_bytes: int) -> list[Path]:
    """Top-level stdlib modules, in name order, until `max_bytes` of text (deterministic per Python version)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if not p.name.startswith(("test", "_")))
    chosen, total = [], 0
    for path in files:
        size = path.stat().st_size
        if total + size > max_bytes:
            continue
        chosen.append(path)
        total += size
    if not chosen:
        raise PuzzleError(f"found no standard-library sources under {root}; pass --data PATH with your own text")
    return chosen


def write_stdlib_corpus(out_dir: Path, max_bytes: int = 3_000_000) -> Path:
    """Copy the chosen modules as .txt documents into `out_dir` (one document per module); skip if present."""
    if out_dir.is_dir() and any(out_dir.glob("*.txt")):
        return out_dir
    with atomic_dir(out_dir) as tmp:
        for path in stdlib_sources(max_bytes):
            text = path.read_text(encoding="utf-8", errors="replace")
            (tmp / f"{path.stem}.txt").write_text(text, encoding="utf-8")
    return out_dir
