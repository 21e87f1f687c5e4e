"""The report's PNG plots (matplotlib, Agg backend). Each function writes one file and returns its path.

matplotlib is the optional `plots` dependency; `available()` says whether it can be imported.
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


def quality_vs_throughput(points: list[dict[str, Any]], xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    """Figure 5: one marker per model; points = [{label, x, y, group}], group in parent|solution|baseline|child."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"parent": ("*", "black", 160), "solution": ("o", "tab:blue", 40), "baseline": ("s", "tab:orange", 40),
              "child": ("D", "tab:green", 50), "uptrained": ("P", "tab:red", 60)}
    for group, (marker, color, size) in styles.items():
        pts = [p for p in points if p["group"] == group]
        if pts:
            ax.scatter([p["x"] for p in pts], [p["y"] for p in pts], marker=marker, c=color, s=size, label=group)
            for p in pts:
                ax.annotate(p["label"], (p["x"], p["y"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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


def curves(series: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str, title: str, path: Path,
           logy: bool = False) -> Path:
    """Line plot of named (x, y) series, e.g. GKD loss per step or BLD loss per layer."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (x, y) in series.items():
        ax.plot(x, y, marker="." if len(x) < 40 else None, label=label)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) <= 12:
        ax.legend(fontsize=7)
    return _save(fig, path)
