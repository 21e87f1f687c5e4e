"""The report's PNG plots (matplotlib, Agg backend). Each function writes one file and returns its path.

matplotlib is a base dependency (every install draws the plots); `available()` still guards an environment
where it cannot be imported, whose report then says so instead of failing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from puzzle.core.artifacts import atomic_path


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, safe on servers
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


# Up to 20 series each get their own colour AND marker (then both repeat with another line style).
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#000000", "#ffd700", "#000080", "#32cd32", "#800000", "#008080", "#ff00ff", "#a0522d",
           "#fa8072", "#6a5acd")
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h", "p", "d", "H", "8", "1", "2", "3", "4", "+")
LINESTYLES = ("-", "--", ":", "-.")


def series_styles(names: list[str]) -> dict[str, dict[str, str]]:
    """name -> matplotlib style kwargs {color, marker, linestyle}, no two alike for up to 80 names."""
    n = len(COLOURS)
    return {name: {"color": COLOURS[i % n], "marker": MARKERS[i % n], "linestyle": LINESTYLES[(i // n) % 4]}
            for i, name in enumerate(names)}


def rate_unit(max_value: float) -> tuple[float, str]:
    """(divisor, unit) that keeps tokens/s axes free of offsets and exponents: tok/s, k tok/s or M tok/s."""
    for scale, unit in ((1e6, "M tok/s"), (1e3, "k tok/s")):
        if max_value >= scale:
            return scale, unit
    return 1.0, "tok/s"


def _legend_outside(ax: Any, **kw: Any) -> Any:
    return ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, **kw)


def pareto(points: list[dict[str, Any]], parent_x: float | None, targets: dict[str, float | None], x_what: str,
           x_note: str, ylabel: str, title: str, path: Path) -> Path:
    """Figure 5: MIP solutions and baselines, coloured by their target and marked by their method, the parent
    as a star, and a dotted line at each target's throughput (baselines are hollow: a baseline on top of a
    solution stays visible). points = [{method, target, x (tok/s), y}]; targets = label -> tok/s (or None)."""
    plt = _pyplot()
    xs = [p["x"] for p in points] + ([parent_x] if parent_x else [])
    scale, unit = rate_unit(max(xs, default=1.0))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours = {t: COLOURS[i % len(COLOURS)] for i, t in enumerate(targets)}
    methods = list(dict.fromkeys(["mip", *(p["method"] for p in points)]))
    markers = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(methods)}
    for p in points:
        colour, hollow = colours.get(p["target"], "grey"), p["method"] != "mip"
        ax.scatter(p["x"] / scale, p["y"], marker=markers[p["method"]], s=70 if hollow else 40, linewidths=1.5,
                   facecolors="none" if hollow else colour, edgecolors=colour)
    for t, x in targets.items():
        if x:
            ax.axvline(x / scale, color=colours[t], ls=":", lw=1)
    if parent_x:
        ax.scatter(parent_x / scale, 0.0, marker="*", c="black", s=160, zorder=3)
    handles = [plt.Line2D([], [], ls="", marker="*", color="black", ms=11, label="parent")]
    handles += [plt.Line2D([], [], ls="", marker=markers[m], color="dimgrey", ms=7,
                           mfc="dimgrey" if m == "mip" else "none", label=m) for m in methods]
    handles += [plt.Line2D([], [], ls=":", marker="o", color=colours[t], label=f"target {t}") for t in targets]
    _legend_outside(ax, handles=handles, title="method / target (dotted: its throughput)", title_fontsize=7)
    ax.ticklabel_format(axis="x", style="plain", useOffset=False)
    ax.set_xlabel(f"{x_what}, {unit}" + (f"\n{x_note}" if x_note else ""))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def models(points: list[dict[str, Any]], x_what: str, x_is_rate: bool, ylabel: str, title: str, path: Path) -> Path:
    """Evaluated models: one colour per model family (a child and its uptrained version share it), marker by
    group (parent star, child diamond, uptrained plus), names in a legend outside the axes instead of labels
    that overlap. points = [{label, x, y, group}] with group in parent|child|uptrained."""
    plt = _pyplot()
    scale, unit = rate_unit(max((p["x"] for p in points), default=1.0)) if x_is_rate else (1e6, "millions")
    families = series_styles(list(dict.fromkeys(p["label"].split("/")[0] for p in points if p["group"] != "parent")))
    marks = {"parent": "*", "child": "D", "uptrained": "P"}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for p in points:
        colour = "black" if p["group"] == "parent" else families[p["label"].split("/")[0]]["color"]
        ax.scatter(p["x"] / scale, p["y"], marker=marks.get(p["group"], "o"), c=colour,
                   s=160 if p["group"] == "parent" else 50, label=p["label"])
    ax.ticklabel_format(axis="x", style="plain", useOffset=False)
    ax.set_xlabel(f"{x_what}, {unit}")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return _save(fig, path)


def layer_costs(attention: list[float | None], ffn: list[float | None], title: str, path: Path) -> Path:
    """Figure 6: each layer's attention and FFN cost relative to the parent's (1 = unchanged, 0 = removed)."""
    plt = _pyplot()
    layers = list(range(len(attention)))
    fig, axes = plt.subplots(2, 1, figsize=(max(6, len(layers) * 0.25), 5), sharex=True)
    for ax, values, name, color in ((axes[0], attention, "attention", "tab:blue"), (axes[1], ffn, "FFN", "tab:green")):
        ax.bar(layers, [v if v is not None else 0 for v in values], color=color)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_ylabel(f"{name} cost / parent")
        ax.set_ylim(0, max(1.1, *(v or 0 for v in values)) * 1.05)
    axes[1].set_xlabel("layer")
    axes[0].set_title(title)
    return _save(fig, path)


def _draw(ax: Any, series: dict[str, tuple[list[float], list[float]]], styles: dict[str, dict[str, str]],
          linestyles: dict[str, str] | None) -> None:
    for label, (x, y) in series.items():
        style = {**styles[label], **({"linestyle": linestyles[label]} if linestyles and label in linestyles else {})}
        ax.plot(x, y, label=label, markersize=5, markevery=max(1, len(x) // 12), **style)


def curves(series: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str, title: str, path: Path,
           logy: bool = False, linestyles: dict[str, str] | None = None) -> Path:
    """Line plot of named (x, y) series (e.g. BLD loss per layer), each with its own colour and marker, the
    legend outside the data. On a log axis, series with no positive value (the parent's own variants, whose
    loss is 0) cannot be drawn: they are left out and named under the legend. `linestyles`: label -> style."""
    plt = _pyplot()
    shown = {k: v for k, v in series.items() if not logy or any(y > 0 for y in v[1])}
    left_out = [k for k in series if k not in shown]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    _draw(ax, shown, series_styles(list(shown)), linestyles)
    if logy and shown:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if shown:
        note = "not drawn (0 on a log axis):\n" + "\n".join(left_out) if left_out else None
        _legend_outside(ax, title=note, title_fontsize=6)
    return _save(fig, path)


def panels(rows: list[tuple[str, dict[str, tuple[list[float], list[float]]], bool]], xlabel: str, title: str,
           path: Path) -> Path:
    """One axis per quantity, stacked over a shared x: rows = [(ylabel, {name: (x, y)}, logy)]. A name keeps
    its colour and marker in every panel (e.g. one child's train loss and validation KL)."""
    plt = _pyplot()
    styles = series_styles(list(dict.fromkeys(n for _, series, _ in rows for n in series)))
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 2.6 * len(rows)), sharex=True, squeeze=False)
    for ax, (ylabel, series, logy) in zip(axes[:, 0], rows):
        _draw(ax, series, styles, None)
        if logy and any(y > 0 for _, ys in series.values() for y in ys):
            ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    _legend_outside(axes[0, 0])
    axes[-1, 0].set_xlabel(xlabel)
    axes[0, 0].set_title(title)
    return _save(fig, path)
