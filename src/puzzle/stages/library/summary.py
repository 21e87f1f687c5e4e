"""What the library stage shows when it ends: every entry's validation nMSE before and after BLD goes to
`library/summary.csv`; the terminal gets the entries BLD fitted worst (a 70-layer model has thousands)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from puzzle.core.artifacts import write_text
from puzzle.core.rundir import RunDir
from puzzle.stages.library.store import LibraryEntry

TOP_ROWS = 10  # rows printed; the CSV holds all of them
COLUMNS = ("layer", "kind", "variant", "init", "val_nmse_init", "val_nmse_after", "tokens")


def _row(e: LibraryEntry) -> list[object]:
    m = e.metrics
    return [e.layer, e.kind, e.variant, m.get("init", ""), m.get("val_nmse_init"), m.get("val_nmse_after"),
            m.get("tokens", 0)]


def _worst_first(e: LibraryEntry) -> tuple[float, int, str]:
    after = e.metrics.get("val_nmse_after")
    return (-(after if after is not None else -math.inf), e.layer, e.variant)


def summary_csv(entries: list[LibraryEntry]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(COLUMNS)
    writer.writerows(_row(e) for e in sorted(entries, key=lambda e: (e.layer, e.kind, e.variant)))
    return buf.getvalue()


def _fmt(x: float | None) -> str:
    return "-" if x is None else ("inf" if math.isinf(x) else f"{x:.4g}")


def summary_table(entries: list[LibraryEntry], limit: int | None = TOP_ROWS) -> str:
    """The `limit` entries with the highest nMSE after BLD (None: all), one line each."""
    header = f"{'layer':>5}  {'kind':<9} {'variant':<22} {'init':<22} {'nMSE init':>10} {'nMSE after':>10}"
    lines = [f"{header} {'tokens':>10}"]
    for e in sorted(entries, key=_worst_first)[:limit]:
        m = e.metrics
        lines.append(f"{e.layer:>5}  {e.kind:<9} {e.variant:<22} {m.get('init', ''):<22} "
                     f"{_fmt(m.get('val_nmse_init')):>10} {_fmt(m.get('val_nmse_after')):>10} {m.get('tokens', 0):>10}")
    return "\n".join(lines)


def write_summary(library_dir: Path, entries: list[LibraryEntry], limit: int = TOP_ROWS) -> str:
    """Write `library_dir/summary.csv`; returns what to print: the `limit` trained entries BLD fitted worst
    (no-ops hold no weights and are 1 by definition) and the CSV's path."""
    path = Path(library_dir) / RunDir.LIBRARY_SUMMARY
    write_text(path, summary_csv(entries))
    trained = [e for e in entries if e.file is not None]
    shown = min(limit, len(trained))
    head = (f"library: {len(entries)} entries; the {shown} trained ones with the highest validation nMSE after "
            f"BLD (all of them: {path})" if len(entries) > shown else f"library: {len(entries)} entries ({path})")
    return head + "\n" + summary_table(trained if len(entries) > shown else entries, limit)
