"""The text tables `puzzle eval` prints from `eval.json`: held-out metrics, and task accuracy per model."""

from __future__ import annotations

from typing import Any


def heldout_table(result: dict[str, Any]) -> str:
    """One line per model: loss, perplexity, KL to the parent, agreement; a note when no split was scored."""
    models = result["models"]
    if not any("lm_loss" in m for m in models.values()):
        return f"held-out metrics skipped: {result.get('heldout_skipped', 'no data split')}"
    lines = [(f"loss / perplexity / KL / agreement on the {result.get('split', 'test')} split "
              f"({result.get('sequences', '?')} sequences)")]
    for name, m in models.items():
        if "lm_loss" in m:
            lines.append(f"{name:32s} loss {m['lm_loss']:.4f}  ppl {m['perplexity']:.2f}  "
                         f"KL {m['kl_to_parent']:.4f}  agree {m['agreement']:.3f}")
    return "\n".join(lines)


def task_table(models: dict[str, dict[str, Any]]) -> str:
    """Accuracy in % per (model, task), `acc/acc_norm` where the task has both, and the mean retention of the
    reference's accuracy; "" when no task was scored."""
    tasks = list(dict.fromkeys(t for m in models.values() for t in m.get("tasks", {})))
    if not tasks:
        return ""

    def cell(m: dict[str, Any] | None) -> str:
        if m is None or "accuracy" not in m:
            return "-"
        text = f"{100 * m['accuracy']:.1f}"
        return text + (f"/{100 * m['acc_norm']:.1f}" if "acc_norm" in m else "")

    rows = [["task accuracy %", *tasks, "retained %"]]
    for name, m in models.items():
        retained = m.get("mean_retention_pct")
        rows.append([name, *(cell(m.get("tasks", {}).get(t)) for t in tasks),
                     "-" if retained is None else f"{retained:.1f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" ".join([r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True))])
             for r in rows]
    if any("/" in c for r in rows[1:] for c in r[1:]):
        lines.append("(accuracy/acc_norm: acc_norm divides each choice's log-likelihood by its length in bytes; "
                     "retention uses each task's `metric`, acc_norm for multiple choice unless the task says otherwise)")
    return "\n".join(lines)
