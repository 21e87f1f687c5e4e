"""The report's long-context section: accuracy and retention per context length from eval.json, and its plot."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from puzzle.core.artifacts import atomic_path
from puzzle.stages.report import plots


def _scored(models: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: m["long_context"] for name, m in models.items() if m.get("long_context")}


def long_context_section(ev: dict[str, Any]) -> str:
    """A markdown table, model x context length: mean accuracy % over the probe tasks (retention % of the
    parent's); '' when eval ran no long-context probes."""
    scored = _scored(ev.get("models", {}))
    if not scored:
        return ""
    lengths = sorted({int(n) for lc in scored.values() for n in lc["mean_accuracy"]})
    meta = ev.get("long_context", {})
    rows = ["| model | " + " | ".join(f"{n} tokens" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for name, lc in scored.items():
        cells = []
        for n in map(str, lengths):
            acc, ret = lc["mean_accuracy"].get(n), lc.get("retention_pct", {}).get(n)
            cells.append("-" if acc is None else f"{100 * acc:.1f}" + ("" if ret is None else f" ({ret:.0f}%)"))
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    tasks = ", ".join(meta.get("tasks", [])) or "the probe tasks"
    return ("## Long-context retention\n\nMean accuracy % over " + tasks + f" ({meta.get('items', '?')} items per "
            f"task and length, haystacks from the {meta.get('haystack_split', '?')} split; retention of the "
            "parent's in brackets, '-' where the parent scores 0):\n\n" + "\n".join(rows) + "\n")


def long_context_plot(models: dict[str, Any], path: Path) -> Path | None:
    """Mean accuracy vs context length, one line per model (eval.json's `models`); None when nothing was scored."""
    series = {}
    for name, lc in _scored(models).items():
        lengths = sorted(int(n) for n in lc["mean_accuracy"])
        series[name] = ([float(n) for n in lengths], [100 * lc["mean_accuracy"][str(n)] for n in lengths])
    if not series:
        return None
    return plots.curves(series, "context length (tokens)", "accuracy % (mean over probe tasks)",
                        "Long-context accuracy by context length", path)


def long_context_figure(ev: dict[str, Any], eval_dir: Path, path: Path) -> Path | None:
    """The long-context figure at `path`: a copy of the one eval drew (eval.json's `long_context.plot` in
    `eval_dir`), drawn here only for an eval.json without one; None when nothing was scored."""
    name = (ev.get("long_context") or {}).get("plot")
    if not name or not (eval_dir / name).is_file():
        return long_context_plot(ev.get("models", {}), path)
    with atomic_path(path) as tmp:
        shutil.copyfile(eval_dir / name, tmp)
    return path
