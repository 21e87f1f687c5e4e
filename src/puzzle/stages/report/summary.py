"""The table printed at the end of `puzzle run`: parent vs chosen children, from the run's artifacts.

Columns: parameters, weights + KV memory of the reference workload, predicted and measured throughput,
KL / agreement / perplexity on the test split (documents no earlier stage read), and task accuracy retained.
Absent artifacts show as '-'.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from puzzle.core.artifacts import read_json
from puzzle.core.notices import read_warnings
from puzzle.core.rundir import RunDir
from puzzle.costs.source import costs_source, prediction_costs, prediction_label
from puzzle.stages.report.serving import serving_lines


def _load(path: Path) -> dict[str, Any]:
    """An absent artifact shows as '-'; a corrupt one is an error (read_json names the file and the fix)."""
    return read_json(path) if path.exists() else {}


def workload_costs(run: RunDir, workload: str | None) -> dict[str, Any] | None:
    """The costs file of `workload` the search read (a measured one over an estimate); None when there is none."""
    found = [c for c in map(_load, run.costs_files()) if (c.get("workload") or {}).get("name") == workload]
    return next((c for c in found if c.get("kind") == "measured"), found[0] if found else None)


def workload_label(workload: str | None, predicted: dict[str, Any] | None) -> str:
    """'chat (TP 2)' for a tensor-parallel workload's prediction, the bare name otherwise ('-' for none)."""
    tp = (predicted or {}).get("tensor_parallel", 1)
    return f"{workload or '-'}" + (f" (TP {tp})" if tp > 1 else "")


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_rows(run_dir: Path | RunDir) -> tuple[list[str], list[list[str]], str | None]:
    """(header, rows, workload) of the summary table."""
    run = RunDir(run_dir)
    evaluation = _load(run.eval_file).get("models", {})
    solutions = _load(run.solutions_in_use())
    predicted_parent = solutions.get("parent", {})
    workload = next(iter(predicted_parent), None)
    # Prefer the workload the search was constrained on.
    for c in solutions.get("constraints", []):
        if c.get("workload") in predicted_parent:
            workload = c["workload"]
            break
    predicted = {s["name"]: s["predicted"] for s in solutions.get("solutions", [])}
    checked = {s["name"]: s["verify"] for s in solutions.get("solutions", []) if "verify" in s}  # timed at search
    rounds = solutions.get("verify", {}).get("rounds")
    tasks = list(dict.fromkeys(t for res in evaluation.values() for t in res.get("retention_pct", {})))
    split = _load(run.eval_file).get("split", "valid")  # eval.json before test splits: valid
    pred = prediction_label(predicted_parent.get(workload or ""))  # an estimate never reads as measured
    header = ["model", "params (M)", f"{pred} tok/s", f"{pred} speed-up", "search meas. x", "rounds", "meas. tok/s",
              "meas. speed-up",
              f"{split} KL", f"{split} top-1", f"{split} ppl",
              *[f"{t} {metric_label(evaluation, t)} (ret. %)" for t in tasks]]
    rows = []
    names = list(evaluation) or ["parent"]
    for name in names:
        res = evaluation.get(name, {})
        base = name.split("/")[0]
        pred = (predicted_parent if name == "parent" else predicted.get(base, {})).get(workload, {})
        measured = res.get("throughput", {}).get(workload, {}) if workload else {}
        speedup = 1.0 if name == "parent" and pred else pred.get("speedup")
        params = res.get("params", pred.get("params"))
        rows.append([
            name,
            _fmt(params / 1e6 if params is not None else None, ".2f"),
            _fmt(pred.get("throughput_tok_s"), ".0f"),
            _fmt(speedup, ".2f"),
            _search_cell(solutions, checked.get(base), name == "parent", workload),
            _fmt(rounds if base in checked else None, "d"),
            _fmt(measured.get("output_tokens_per_s"), ".0f"),
            _fmt(res.get("speedup", {}).get(workload), ".3f"),
            _fmt(res.get("kl_to_parent"), ".4f"),
            _fmt(res.get("agreement"), ".3f"),
            _fmt(res.get("perplexity"), ".2f"),
            *[_task_cell(res, t) for t in tasks],
        ])
    return header, rows, workload


def _search_cell(solutions: dict[str, Any], check: dict[str, Any] | None, parent: bool, workload: str | None) -> str:
    """The speed-up the search measured (`puzzle.stages.search.verify`), flagged when the child missed its target."""
    if parent:
        return "1.000" if (solutions.get("verify", {}).get("parent_measured") or {}).get(workload) else "-"
    if not check:
        return "-"
    speedup = check.get("measured", {}).get(workload, {}).get("speedup")
    return _fmt(speedup, ".3f") + ("" if check.get("meets_target") else " MISSED")


def task_score(result: dict[str, Any]) -> float | None:
    """A task's reported number in eval.json: its primary metric (`score`, see `stages.evaluate.tasks.primary_metric`),
    or accuracy in files written before tasks had one."""
    return result.get("score", result.get("accuracy"))


def metric_label(models: dict[str, Any], task: str) -> str:
    """The column name of a task's reported metric: `acc_norm`, or `acc` (also for eval.json without one)."""
    metric = next((m["tasks"][task].get("metric") for m in models.values() if task in m.get("tasks", {})), None)
    return "acc_norm" if metric == "acc_norm" else "acc"


def _task_cell(res: dict[str, Any], task: str) -> str:
    acc = task_score(res.get("tasks", {}).get(task, {}))
    ret = res.get("retention_pct", {}).get(task)
    return "-" if acc is None else f"{acc:.3f} ({_fmt(ret, '.1f')})"


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([line, "  ".join("-" * w for w in widths), *body])


def print_summary(run_dir: Path | RunDir) -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 prints (the group is already torn down)
        return
    run = RunDir(run_dir)
    header, rows, workload = summary_rows(run)
    parent = _load(run.solutions_in_use()).get("parent", {}).get(workload or "", {})
    if not parent:
        source = "no predictions: the search has not run"
    else:
        costs = prediction_costs(workload_costs(run, workload), parent)
        source = f"{prediction_label(parent)} tok/s and speed-up: {costs_source(costs)}"
    evaluation = _load(run.eval_file)
    quality = (f"; KL / top-1 / ppl on the {evaluation.get('split', 'valid')} split, "
               f"{evaluation.get('sequences', '?')} sequences of {evaluation.get('seq_len', '?')} tokens"
               if evaluation else "")
    print(f"\nSummary of {run.root} (throughput: workload {workload_label(workload, parent)}{quality})")
    print(format_table(header, rows))
    print(source)
    for line in serving_lines(run):  # which engines serve each child (puzzle.formats.engines)
        print(line)
    verify = _load(run.solutions_in_use()).get("verify", {})
    if verify.get("status") == "skipped":
        print(f"search meas.: not timed at search ({verify.get('reason')})")
    elif verify:
        print(f"search meas.: each child timed at search as eval times it (random weights), {verify.get('rounds')} "
              f"round(s) of search.verify_rounds={verify.get('verify_rounds')}: {verify.get('status')}")
    for w in read_warnings(run.root):
        print(f"warning ({w['stage']}): {w['message']}")
    report = run.report
    if report.exists():
        print(f"\nReport: {report}")
        pngs = sorted(p.name for p in run.plots.glob("*.png"))
        print(f"Plots:  {run.plots}/ ({', '.join(pngs)})" if pngs else "Plots:  none (see the report's notes)")
