"""`report.md` and PNG plots from whatever stages have run (absent inputs are noted, never fatal).

Reads eval/eval.json, search/solutions.json, costs/*.json, library/**.json sidecars, children/*/ configs and
children/*/uptrained/training_log.json. Writes `RUN_DIR/report.md` and `RUN_DIR/report/*.png`:
  quality_vs_throughput.png  the paper's Figure 5: predicted throughput vs replace-1-block score (solutions,
                             baselines, parent), and measured throughput vs quality of evaluated models
  layer_costs-<child>.png    Figure 6: each layer's attention and FFN cost relative to the parent
  bld_losses.png, gkd_curves.png   BLD validation loss per layer and variant; GKD loss / KL per step
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from puzzle.core.artifacts import hash_file, hash_json, mark_stage_done, stage_is_current, write_text
from puzzle.core.config import to_dict
from puzzle.core.errors import PuzzleError
from puzzle.core.rundir import RunDir
from puzzle.costs.consistency import adjustment_rows
from puzzle.costs.source import costs_source, prediction_costs, prediction_label, short_source
from puzzle.formats import load_model_config
from puzzle.model.blocks import AttentionConfig, BlockConfig, FFNConfig
from puzzle.stages.report import plots as report_plots
from puzzle.stages.report.long_context import long_context_figure, long_context_section
from puzzle.stages.report.summary import metric_label, task_score, workload_label
from puzzle.stages.search.targets import parse_target

COST_METRICS = ("workload", "decode_step_s", "prefill_s")  # what a layer's cost means in layer_costs plots


@dataclass
class ReportConfig:
    workload: str | None = None  # the workload plotted (a name of the run's workloads); default: the first found
    cost_metric: str = "workload"  # 'workload' (prefill + gen_len decode steps), 'decode_step_s' or 'prefill_s'
    plots: bool = True

    def __post_init__(self) -> None:
        if self.cost_metric not in COST_METRICS:
            raise PuzzleError(f"report.cost_metric {self.cost_metric!r} is not one of {list(COST_METRICS)}")


@dataclass
class ReportInputs:
    eval: dict[str, Any] | None = None
    solutions: dict[str, Any] | None = None
    costs: dict[str, dict[str, Any]] = field(default_factory=dict)  # workload name -> costs JSON
    library: list[dict[str, Any]] = field(default_factory=list)  # library sidecars (entries)
    gkd: dict[str, dict[str, Any]] = field(default_factory=dict)  # child name -> training log
    parent_blocks: list[BlockConfig] | None = None
    children: dict[str, list[BlockConfig]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _json(path: Path, notes: list[str], what: str) -> Any:
    if not path.exists():
        notes.append(f"{what}: {path.name} not found (run its stage to include it)")
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        notes.append(f"{what}: {path} is not valid JSON; skipped")
        return None


def _blocks(path: Path, notes: list[str]) -> list[BlockConfig] | None:
    try:
        return list(load_model_config(path).blocks)
    except PuzzleError as e:
        notes.append(f"{path}: {e}")
        return None


def gather(run_dir: Path | RunDir) -> ReportInputs:
    run = RunDir(run_dir)
    inp = ReportInputs()
    inp.eval = _json(run.eval_file, inp.notes, "evaluation")
    inp.solutions = _json(run.solutions_in_use(), inp.notes, "search")
    for path in run.costs_files():
        data = _json(path, inp.notes, "costs") or {}
        name = data.get("workload", {}).get("name", path.stem)
        if name not in inp.costs or data.get("kind") == "measured":  # measured costs win over estimates
            inp.costs[name] = data
    for path in run.library_entry_files():
        entry = _json(path, inp.notes, "library")
        if isinstance(entry, dict) and "layer" in entry:
            inp.library.append(entry)
    if run.parent.exists():
        inp.parent_blocks = _blocks(run.parent, inp.notes)
    for child in run.child_dirs():
        blocks = _blocks(child, inp.notes) if RunDir.model_config(child).exists() else None
        if blocks is not None:
            inp.children[child.name] = blocks
        log = run.training_log(child.name)
        if log.exists():
            inp.gkd[child.name] = _json(log, inp.notes, "uptrain")
    return inp


def library_variant(entry: dict[str, Any]) -> str:
    """'gqa2', 'swiglu256' or 'gqa2+swiglu256' from a library sidecar."""
    parts = [AttentionConfig.from_dict(entry["attention"]).name] if entry.get("attention") else []
    parts += [FFNConfig.from_dict(entry["ffn"]).name] if entry.get("ffn") else []
    return "+".join(parts)


# ---- costs -------------------------------------------------------------------------------------------------


def variant_cost(costs: dict[str, Any], kind: str, name: str, metric: str) -> float | None:
    rec = costs.get(kind, {}).get(name)
    if not rec or rec.get("oom") or rec.get("prefill_s") is None:
        return None
    if metric == "workload":
        gen = costs.get("workload", {}).get("gen_len", 1)
        return rec["prefill_s"] + (gen - 1) * rec["decode_step_s"]
    return rec.get(metric)


def relative_layer_costs(parent: list[BlockConfig], child: list[BlockConfig], costs: dict[str, Any] | None,
                         metric: str) -> tuple[list[float | None], list[float | None], str]:
    """Per layer: child attention / FFN cost over the parent's, from measured costs, else parameter counts."""
    att, ffn = [], []
    source = short_source(costs)  # an estimate says so in every table header and plot title
    for p, c in zip(parent, child, strict=True):
        for out, kind, pv, cv in ((att, "attention", p.attention, c.attention), (ffn, "ffn", p.ffn, c.ffn)):
            if costs:
                base, mine = variant_cost(costs, kind, pv.name, metric), variant_cost(costs, kind, cv.name, metric)
                out.append(mine / base if base and mine is not None else None)
            else:
                out.append(None)
    return att, ffn, source


# ---- markdown ----------------------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def eval_section(ev: dict[str, Any]) -> str:
    models = ev.get("models", {})
    tasks = sorted({t for m in models.values() for t in m.get("tasks", {})})
    workloads = sorted({w for m in models.values() for w, r in m.get("throughput", {}).items()
                        if isinstance(r, dict) and "output_tokens_per_s" in r})
    header = ["model", "params", "LM loss", "ppl", "KL to parent", "top-1 agree", *[f"{t} {metric_label(models, t)}" for t in tasks],
              "retained %", *[f"{w} tok/s" for w in workloads], *[f"{w} speedup" for w in workloads]]
    rows = []
    for name, m in models.items():
        rows.append([name, m.get("params"), m.get("lm_loss"), m.get("perplexity"), m.get("kl_to_parent"),
                     m.get("agreement"), *[task_score(m.get("tasks", {}).get(t, {})) for t in tasks],
                     m.get("mean_retention_pct"),
                     *[m.get("throughput", {}).get(w, {}).get("output_tokens_per_s") for w in workloads],
                     *[m.get("speedup", {}).get(w) for w in workloads]])
    skipped = {r.get("skipped") for m in models.values() for r in [m.get("throughput", {})] if "skipped" in r}
    note = f"\n\nThroughput: {skipped.pop()}." if skipped else ""
    split = ev.get("split", "valid")  # eval.json written before test splits existed: valid
    where = (f"LM loss, perplexity, KL and top-1 agreement on the {split} split: {ev.get('sequences', '?')} "
             f"sequences of {ev.get('seq_len', '?')} tokens"
             + (" from documents that no earlier stage read (BLD, scoring and uptraining use train and valid)."
                if split == "test" else " (the split scoring chose blocks on; not held out from selection)."))
    return f"## Quality (held-out, against the parent)\n\n{where}\n\n{table(header, rows)}{note}\n"


def solutions_section(sol: dict[str, Any], costs: dict[str, dict[str, Any]]) -> str:
    workloads = sorted(sol.get("parent", {}))
    header = ["method", "name", "target", "objective", "attention layers",
              *[f"{workload_label(w, sol['parent'][w])} {prediction_label(sol['parent'][w], 'ESTIMATED')} speedup"
                for w in workloads]]
    rows = [["mip", s.get("name"), s.get("target"), s.get("objective"), s.get("attention_layers"),
             *[s.get("predicted", {}).get(w, {}).get("speedup") for w in workloads]] for s in sol.get("solutions", [])]
    rows += [[b.get("method"), "", b.get("target"), b.get("objective"), b.get("attention_layers"),
              *[b.get("predicted", {}).get(w, {}).get("speedup") for w in workloads]]
             for b in sol.get("baselines", []) if b.get("feasible", True)]
    sources = "\n".join(f"- {workload_label(w, sol['parent'][w])}: "
                        f"{costs_source(prediction_costs(costs.get(w), sol['parent'][w]))}"
                        for w in workloads)
    return f"## Search solutions (predicted, not measured)\n\nSpeed-ups from the costs file of each workload:\n\n" \
           f"{sources}\n\n{table(header, rows)}\n"


def architecture_section(name: str, parent: list[BlockConfig] | None, child: list[BlockConfig],
                         att_rel: list[float | None], ffn_rel: list[float | None], source: str) -> str:
    rows = [[i, b.attention.name, b.ffn.name, parent[i].name if parent else "-", att_rel[i], ffn_rel[i]]
            for i, b in enumerate(child)]
    header = ["layer", "attention", "FFN", "parent", f"attention cost / parent ({source})", "FFN cost / parent"]
    return f"### {name}\n\n{table(header, rows)}\n"


def gkd_section(logs: dict[str, dict[str, Any]]) -> str:
    rows = []
    for name, log in logs.items():
        valid = log.get("valid", [])
        first, last = (valid[0], valid[-1]) if valid else ({}, {})
        rows.append([name, log.get("steps"), log.get("train", [{}])[-1].get("tokens") if log.get("train") else None,
                     first.get("kl"), last.get("kl"), first.get("agreement"), last.get("agreement")])
    header = ["child", "steps", "tokens", "valid KL before", "valid KL after", "agreement before", "agreement after"]
    return f"## Global distillation (GKD)\n\n{table(header, rows)}\n"


# ---- the stage ---------------------------------------------------------------------------------------------


def _workload(inp: ReportInputs, cfg: ReportConfig) -> str | None:
    if cfg.workload:
        return cfg.workload
    if inp.solutions and inp.solutions.get("parent"):
        return next(iter(inp.solutions["parent"]))
    return next(iter(inp.costs), None)


def _fig5_points(inp: ReportInputs, workload: str) -> tuple[list[dict[str, Any]], float | None, dict[str, float | None]]:
    """(points [{method, target, x, y}], the parent's tok/s, target label -> the tok/s it asks for or None)."""
    sol = inp.solutions or {}
    points = []
    parent_x = (sol.get("parent", {}).get(workload) or {}).get("throughput_tok_s")
    for method, items in (("mip", sol.get("solutions", [])), (None, sol.get("baselines", []))):
        for s in items:
            pred = s.get("predicted", {}).get(workload)
            if pred and s.get("objective") is not None:
                points.append({"method": method or s.get("method", "baseline"), "target": str(s.get("target")),
                               "x": pred["throughput_tok_s"], "y": s["objective"]})
    return points, parent_x, {t: _target_rate(sol, t, workload, parent_x) for t in
                              dict.fromkeys(p["target"] for p in points)}


def _target_rate(sol: dict[str, Any], target: str, workload: str, parent_x: float | None) -> float | None:
    """The tok/s a swept throughput target on `workload` asks for; None for other constraints."""
    constraints = sol.get("constraints") or []
    index = (sol.get("config") or {}).get("sweep_constraint") or 0
    c = constraints[index] if index < len(constraints) else {}
    if c.get("kind") != "throughput" or c.get("workload") != workload:
        return None
    try:
        value, factor = parse_target("throughput", target)
    except PuzzleError:
        return None
    return value * parent_x if factor and parent_x else None if factor else value


def _measured_points(ev: dict[str, Any], workload: str | None) -> tuple[list[dict[str, Any]], str]:
    """Evaluated models: measured tok/s (or parameter count without a GPU) vs retention (or KL)."""
    points, xlabel = [], "parameters"
    for name, m in ev.get("models", {}).items():
        tp = m.get("throughput", {}).get(workload or "", {})
        x = tp.get("output_tokens_per_s") if isinstance(tp, dict) else None
        if x is not None:
            xlabel = f"measured output throughput ({workload})"
        y = m.get("mean_retention_pct")
        group = "parent" if name == "parent" else "uptrained" if name.endswith("/uptrained") else "child"
        points.append({"label": name, "x": x if x is not None else m.get("params", 0),
                       "y": y if y is not None else m.get("kl_to_parent"), "group": group})
    return points, xlabel


def run_report(run_dir: Path | RunDir, cfg: ReportConfig | None = None) -> Path:
    """Write `run_dir/report.md` (+ `run_dir/report/*.png`); returns the report's path."""
    cfg = cfg or ReportConfig()
    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise PuzzleError(f"run directory {run.root} does not exist; pass the directory `puzzle run` wrote")
    plots_dir = run.plots
    plots = cfg.plots and report_plots.available()
    inputs_hash = _inputs_hash(run, cfg, plots)
    out = run.report
    if out.exists() and stage_is_current(plots_dir, inputs_hash):
        return out  # nothing it reads has changed: a second `puzzle run` leaves the report untouched
    inp = gather(run)
    if cfg.plots and not plots:
        inp.notes.append("plots skipped: matplotlib cannot be imported (it is a dependency: pip install matplotlib)")
    workload = _workload(inp, cfg)
    parts = [f"# Puzzle report: {run.root.name}\n"]
    figures: list[tuple[str, Path]] = []
    if inp.eval:
        parts.append(eval_section(inp.eval))
        if section := long_context_section(inp.eval):
            parts.append(section)
            drawn = long_context_figure(inp.eval, run.eval, plots_dir / "long_context.png") if plots else None
            if drawn:
                figures.append(("Long-context accuracy by context length", drawn))
        if plots and inp.eval.get("models"):
            pts, xlabel = _measured_points(inp.eval, workload)
            has_ret = any(m.get("mean_retention_pct") is not None for m in inp.eval["models"].values())
            figures.append(("Evaluated models", report_plots.models(
                pts, xlabel, xlabel != "parameters", "accuracy retained (% of parent)" if has_ret else
                f"KL(parent || model), {inp.eval.get('split', 'valid')} split",
                "Evaluated models" if xlabel != "parameters" else "Evaluated models (throughput is measured on a GPU only)",
                plots_dir / "measured_quality.png")))
    if inp.solutions:
        parts.append(solutions_section(inp.solutions, inp.costs))
        if plots and workload:
            points, parent_x, targets = _fig5_points(inp, workload)
            predicted = inp.solutions.get("parent", {}).get(workload)
            source = costs_source(prediction_costs(inp.costs.get(workload), predicted))
            figures.append(("Quality vs throughput (Fig. 5)", report_plots.pareto(
                points, parent_x, targets,
                f"{prediction_label(predicted, 'ESTIMATED', 'predicted')} output throughput ({workload})", source,
                f"summed replace-1-block {inp.solutions.get('metric', 'score')} (lower is better)",
                "Solutions, baselines and parent", plots_dir / "quality_vs_throughput.png")))
    if inp.children:
        parts.append("## Chosen architectures\n")
        costs = inp.costs.get(workload) if workload else None
        for name, blocks in inp.children.items():
            if inp.parent_blocks is None or len(inp.parent_blocks) != len(blocks):
                att = ffn = [None] * len(blocks)
                source = "parent unavailable"
            else:
                att, ffn, source = relative_layer_costs(inp.parent_blocks, blocks, costs, cfg.cost_metric)
            parts.append(architecture_section(name, inp.parent_blocks, blocks, att, ffn, source))
            if plots and any(v is not None for v in att + ffn):
                figures.append((f"Per-layer cost of {name} (Fig. 6)", report_plots.layer_costs(
                    att, ffn, f"{name}: cost relative to the parent ({source}, {workload})",
                    plots_dir / f"layer_costs-{name}.png")))
    if inp.gkd:
        parts.append(gkd_section(inp.gkd))
        if plots:
            train = {n: ([r["step"] for r in g["train"]], [r["loss"] for r in g["train"]])
                     for n, g in inp.gkd.items() if g.get("train")}
            valid = {n: ([v["step"] for v in g["valid"]], [v["kl"] for v in g["valid"]])
                     for n, g in inp.gkd.items() if g.get("valid")}
            figures.append(("GKD curves", report_plots.panels(
                [("train loss\n(GKD objective)", train, True), ("validation\nKL(parent || child)", valid, True)],
                "step", "Global distillation", plots_dir / "gkd_curves.png")))
    if inp.library and plots:
        bld: dict[str, tuple[list[float], list[float]]] = {}
        for e in sorted(inp.library, key=lambda e: e["layer"]):
            val = e.get("metrics", {}).get("val_nmse_after")
            if val is not None:
                xs, ys = bld.setdefault(f"{e['kind']} {library_variant(e)}", ([], []))
                xs.append(e["layer"])
                ys.append(val)
        if bld:
            figures.append(("BLD validation loss per layer", report_plots.curves(
                bld, "layer", "normalised MSE to the parent block (after BLD)",
                "Blockwise local distillation (solid: attention, dashed: FFN)", plots_dir / "bld_losses.png",
                logy=True, linestyles={k: "-" if k.startswith("attention") else "--" for k in bld})))
    if adjusted := adjustment_rows(inp.costs):
        parts.append("## Per-variant costs made width-consistent\n\nMore KV heads or a wider FFN never cost less: "
                     "measured values that broke that order (after re-measuring) were fitted (isotonic, per phase; "
                     "`consistency` in each costs file).\n\n"
                     + table(["workload", "variant", "phase", "measured us", "adjusted us"], adjusted) + "\n")
    if figures:
        parts.append("## Plots\n\n" + "\n\n".join(f"![{t}]({p.relative_to(run.root).as_posix()})" for t, p in figures)
                     + "\n")
    if inp.notes:
        parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in inp.notes) + "\n")
    write_text(out, "\n".join(parts))
    mark_stage_done(plots_dir, "report", inputs_hash)
    return out


def _inputs_hash(run: RunDir, cfg: ReportConfig, plots: bool) -> str:
    """Every file `gather` reads (small JSON files only), the config and whether plots can be drawn."""
    children = run.child_dirs()
    candidates = [run.eval_file, run.solutions_in_use(), *run.costs_files(), *run.library_entry_files(),
                  RunDir.model_config(run.parent), *(RunDir.model_config(c) for c in children),
                  *(run.training_log(c.name) for c in children)]
    files = sorted(p for p in candidates if p.is_file())
    return hash_json({"files": {str(p.relative_to(run.root)): hash_file(p) for p in files},
                      "config": to_dict(cfg), "plots": plots})
