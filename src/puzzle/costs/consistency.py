"""Per-variant costs that respect the width order: more KV heads or a wider FFN never cost less.

Measured per-variant times are differences of two timed stacks and carry noise; a narrower variant can then
time slower than a wider one, and the MIP would choose on that noise. After measuring, `make_consistent`
1. finds every pair in a chain (gqa variants by KV heads, SwiGLU variants by intermediate size) where the
   narrower costs more than the wider in a phase (prefill_s, decode_step_s), and whether by more than the
   two measurements' spreads added (`prefill_spread_s` / `decode_spread_s`: the timed stack's IQR per layer;
   files without them: rel_spread x value);
2. times the variants of the pairs beyond their spread again (`remeasure`, at most `rounds` extra rounds);
   a re-measured variant's value and spread are the medians over its rounds;
3. fits what still breaks the order with a weighted isotonic regression per chain and phase (scipy), weight
   1 / spread^2, so a precise measurement moves less than a noisy one (for a re-measured variant, the spread
   is at least its rounds' disagreement, max - min). The parent's own variants (`anchors`) are also checked
   by the whole parent's measurement (the calibration), so they weigh ANCHOR times more and stay put: moving
   them would move every child's prediction through the calibration (on the reference run's costs, an
   unanchored fit raised gqa8's decode step by 13% and the children's prediction error from 2.0% to 4.7%).
The variant records keep the consistent values (what `puzzle.costs.table.predict` and the search use); the returned
section records the first measurement, the violations, the re-measurements and every value the fit changed.
Linear and no-op variants are outside the chains (a linear FFN is not narrower or wider than a SwiGLU).

`python -m puzzle.costs.consistency FILE.json ...` re-checks costs files and prints the violations and the fit.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import isotonic_regression

PARTS = ("attention", "ffn")
PHASES = {"prefill_s": "prefill_rel_spread", "decode_step_s": "decode_rel_spread"}
SPREAD_S = {"prefill_s": "prefill_spread_s", "decode_step_s": "decode_spread_s"}
WIDTH = {"attention": re.compile(r"^gqa(\d+)$"), "ffn": re.compile(r"^swiglu(\d+)$")}
REL_FLOOR = 1e-3  # a spread of 0 (one sample) still gets a finite weight, as if 0.1% of the chain's median
ANCHOR = 1e12  # weight factor of the parent's own variants in the fit
RULE = ("per phase (prefill_s, decode_step_s): gqaK costs at least gqaJ for K > J; swigluN at least swigluM "
        "for N > M")

# (part, variant name) -> its times and spreads timed again ({prefill_s, decode_step_s, prefill_rel_spread,
# decode_rel_spread, prefill_spread_s, decode_spread_s}), or None when it could not be timed (out of memory)
Remeasure = Callable[[str, str], dict[str, float] | None]


def chains(costs: dict[str, Any]) -> dict[str, list[str]]:
    """Per part, the timed variants of one family, narrow to wide (out-of-memory ones left out)."""
    out = {}
    for part in PARTS:
        widths = {}
        for name, rec in costs.get(part, {}).items():
            m = WIDTH[part].match(name)
            if m and not rec.get("oom") and all(isinstance(rec.get(k), (int, float)) for k in PHASES):
                widths[name] = int(m.group(1))
        out[part] = sorted(widths, key=widths.__getitem__)
    return out


def abs_spread(rec: dict[str, Any], phase: str) -> float:
    """A variant's spread in seconds per layer for `phase`: IQR of its stack / layers (old files: rel x value)."""
    if isinstance(rec.get(SPREAD_S[phase]), (int, float)):
        return float(rec[SPREAD_S[phase]])
    return float(rec.get(PHASES[phase]) or 0.0) * float(rec[phase])


def violations(costs: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (narrower, wider) pair of a chain where the narrower costs more, per phase."""
    found = []
    for part, names in chains(costs).items():
        recs = costs[part]
        for phase in PHASES:
            for i, narrow in enumerate(names):
                for wide in names[i + 1:]:
                    a, b = recs[narrow], recs[wide]
                    if a[phase] > b[phase]:
                        spread = abs_spread(a, phase) + abs_spread(b, phase)
                        excess = a[phase] - b[phase]
                        found.append({"part": part, "phase": phase, "narrow": narrow, "wide": wide,
                                      "narrow_s": a[phase], "wide_s": b[phase], "excess_s": excess,
                                      "spread_s": spread, "beyond_spread": excess > spread})
    return found


def _pool(rounds: list[dict[str, float]]) -> dict[str, float]:
    """One value and spread per phase from a variant's rounds: their medians."""
    out = {}
    for phase, rel_key in PHASES.items():
        out[phase] = statistics.median(r[phase] for r in rounds)
        out[rel_key] = statistics.median(r[rel_key] for r in rounds)
        out[SPREAD_S[phase]] = statistics.median(abs_spread(r, phase) for r in rounds)
    return out


def _fit_spread(rec: dict[str, Any], phase: str, rounds: list[dict[str, float]]) -> float:
    """The spread that weighs a variant in the fit: its measured one, at least its rounds' disagreement."""
    values = [r[phase] for r in rounds]
    return max(abs_spread(rec, phase), max(values) - min(values) if values else 0.0)


def isotonic_fit(values: list[float], spreads_s: list[float], anchored: list[bool] | None = None) -> list[float]:
    """The non-decreasing sequence nearest to `values`, weighted by 1 / spread^2 (spreads in seconds), x ANCHOR
    where `anchored`."""
    y = np.asarray(values, dtype=float)
    scale = float(np.median(y[y > 0])) if (y > 0).any() else 1.0
    sigma = np.maximum(np.asarray(spreads_s, dtype=float), REL_FLOOR * scale)
    weights = np.where(np.asarray(anchored or [False] * len(values)), ANCHOR, 1.0) / sigma**2
    fitted = isotonic_regression(y, weights=weights, increasing=True).x
    # a value the fit leaves alone (or all but: an anchor) stays bit-identical; then exactly non-decreasing
    out = [v if abs(f - v) <= 1e-9 * max(abs(v), scale) else float(f) for v, f in zip(values, fitted)]
    for i in range(len(out) - 2, -1, -1):
        out[i] = min(out[i], out[i + 1])
    return out


def _summary(rec: dict[str, Any]) -> dict[str, float]:
    """A variant's times and spreads (absolute spreads made explicit)."""
    return {k: v for phase, rel in PHASES.items()
            for k, v in ((phase, rec[phase]), (rel, rec.get(rel) or 0.0), (SPREAD_S[phase], abs_spread(rec, phase)))}


def make_consistent(costs: dict[str, Any], remeasure: Remeasure | None = None, rounds: int = 0,
                    anchors: set[tuple[str, str]] | frozenset[tuple[str, str]] = frozenset()) -> dict[str, Any]:
    """Re-measure the variants of violations beyond their spread, then fit the rest; edits `costs` in place.

    anchors: (part, variant name) of the parent's own variants, which the fit keeps in place where it can.

    Returns the `consistency` section of the costs file (see the module docstring).
    """
    names = chains(costs)
    raw = {part: {n: _summary(costs[part][n]) for n in names[part]} for part in PARTS}
    first = violations(costs)
    history: dict[tuple[str, str], list[dict[str, float]]] = {}
    remeasured = []
    for r in range(1, rounds + 1 if remeasure is not None else 1):
        involved = sorted({(v["part"], v[side]) for v in violations(costs) if v["beyond_spread"]
                           for side in ("narrow", "wide")})
        if not involved:
            break
        timed = {}
        for part, name in involved:
            again = remeasure(part, name)  # type: ignore[misc]
            if again is None:
                continue
            runs = history.setdefault((part, name), [raw[part][name]])
            runs.append(_summary(again))
            costs[part][name].update(_pool(runs))
            timed[f"{part}:{name}"] = runs[-1]
        remeasured.append({"round": r, "variants": timed})
    remaining = violations(costs)
    adjusted = []
    for part in PARTS:
        recs = costs[part]
        for phase in PHASES:
            if not any(v["part"] == part and v["phase"] == phase for v in remaining):
                continue
            chain = names[part]
            spreads = [_fit_spread(recs[n], phase, history.get((part, n), [])) for n in chain]
            fitted = isotonic_fit([recs[n][phase] for n in chain], spreads, [(part, n) in anchors for n in chain])
            for name, value in zip(chain, fitted):
                if value != recs[name][phase]:
                    adjusted.append({"part": part, "variant": name, "phase": phase,
                                     "measured_s": recs[name][phase], "adjusted_s": value})
                    recs[name][phase] = value
    return {"rule": RULE, "chains": names, "max_remeasure_rounds": rounds if remeasure is not None else 0,
            "anchors": sorted(f"{part}:{name}" for part, name in anchors), "raw": raw, "violations": first, "remeasured": remeasured, "remaining": remaining,
            "adjusted": adjusted}


def check(costs: dict[str, Any], anchors: set[tuple[str, str]] | frozenset[tuple[str, str]] = frozenset()
          ) -> tuple[dict[str, Any], dict[str, Any]]:
    """A costs file's violations and isotonic fit without re-measuring: (consistent copy, its section)."""
    out = copy.deepcopy(costs)
    return out, make_consistent(out, anchors=anchors)


def parent_anchors(blocks: Any) -> frozenset[tuple[str, str]]:
    """(part, name) of every attention and FFN variant the parent's layers use."""
    return frozenset(pair for b in blocks for pair in (("attention", b.attention.name), ("ffn", b.ffn.name)))


def adjustment_rows(costs_by_workload: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """[workload, variant, phase, measured us, adjusted us] for every value a costs file's fit changed."""
    rows = []
    for workload, costs in costs_by_workload.items():
        for a in (costs.get("consistency") or {}).get("adjusted", []):
            rows.append([workload, f"{a['part']}:{a['variant']}", a["phase"], a["measured_s"] * 1e6,
                         a["adjusted_s"] * 1e6])
    return rows


def summary_line(section: dict[str, Any]) -> str | None:
    """One line for the log when the width order was broken: counts of violations, re-measured and fitted."""
    if not section["violations"]:
        return None
    beyond = sum(v["beyond_spread"] for v in section["violations"])
    again = sorted({n for r in section["remeasured"] for n in r["variants"]})
    return (f"{len(section['violations'])} pair(s) broke the width order ({beyond} beyond their spread); "
            f"re-measured {again or 'none'}; the isotonic fit changed {len(section['adjusted'])} value(s) "
            "(listed under `consistency` in the costs file)")


def describe(costs: dict[str, Any], section: dict[str, Any]) -> str:
    """Human-readable violations and fit of one costs file."""
    head = (f"{costs.get('device_key', '?')} / {costs.get('workload', {}).get('name', '?')}: "
            f"{len(section['violations'])} violation(s) of the width order")
    lines = [head]
    for v in section["violations"]:
        lines.append(f"  {v['part']:9s} {v['phase']:13s} {v['narrow']:>10s} {v['narrow_s'] * 1e6:9.2f} us > "
                     f"{v['wide']:<10s} {v['wide_s'] * 1e6:9.2f} us  by {v['excess_s'] * 1e6:8.2f} us, spread "
                     f"{v['spread_s'] * 1e6:8.2f} us{'  BEYOND SPREAD' if v['beyond_spread'] else ''}")
    for a in section["adjusted"]:
        lines.append(f"  fit: {a['part']}:{a['variant']} {a['phase']} {a['measured_s'] * 1e6:.2f} -> "
                     f"{a['adjusted_s'] * 1e6:.2f} us")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m puzzle.costs.consistency", description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="costs/<device>-<workload>.json files")
    ap.add_argument("--anchor", action="append", default=[], metavar="PART:NAME",
                    help="a variant of the parent, kept in place by the fit (e.g. attention:gqa8); repeatable")
    ap.add_argument("--json", action="store_true", help="print the consistency sections as JSON")
    args = ap.parse_args(argv)
    anchors = frozenset(tuple(a.split(":", 1)) for a in args.anchor)
    sections = {}
    for path in args.files:
        data = json.loads(path.read_text())
        _, section = check(data, anchors)  # type: ignore[arg-type]
        sections[str(path)] = section
        if not args.json:
            print(f"{path}\n{describe(data, section)}")
    if args.json:
        print(json.dumps(sections, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
