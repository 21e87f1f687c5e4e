"""`puzzle search`: choose one block per layer with a MIP under deployment targets, as the Puzzle paper does.

Targets are written the way users think:
    {kind: throughput, target: "2x", workload: text-generation}   2x the parent's tokens/s (or "1500" tok/s)
    {kind: latency, target: "1.5s", workload: chatbot}            whole-workload time (ttft: time to first token)
    {kind: memory, target: "80GiB", workload: summarization}      weights + KV cache for that workload
    {kind: params, target: "7B"}                                  parameter budget
    {kind: min_attention_layers, target: 8}                       at least 8 layers keep GQA attention
Inputs: `scores/scores.json` (objective) and `costs/<device>-<workload>.json` (constraints).
Outputs: `search/solutions.json` (+ CSV): MIP solutions (diverse, over a sweep of targets) with predicted costs,
and the paper's baselines (greedy, max-parameters) on the same constraints.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from puzzle.stages.search import mip
from puzzle.core.artifacts import (
    hash_json,
    hash_paths,
    mark_stage_done,
    read_json,
    stage_is_current,
    write_json,
    write_text,
)
from puzzle.model.blocks import BlockConfig
from puzzle.core.config import to_dict
from puzzle.core.errors import PuzzleError
from puzzle.costs.table import CostTable, load_cost_table, measured_workloads

ConstraintKind = Literal["throughput", "latency", "ttft", "memory", "params", "min_attention_layers"]
Metric = Literal["kl", "lm_loss", "lm_loss_delta", "top1", "top5", "task_accuracy"]
HIGHER_IS_BETTER = {"top1", "top5", "task_accuracy"}
NEEDS_WORKLOAD = {"throughput", "latency", "ttft", "memory"}


@dataclass
class ConstraintSpec:
    kind: ConstraintKind
    target: str  # "2x", "1500", "1.5s", "200ms", "80GiB", "7B", "8"
    workload: str | None = None  # named workload (throughput, latency, ttft, memory)


@dataclass
class SearchConfig:
    metric: Metric = "kl"
    device: str = "auto"  # which costs/<device>-<workload>.json; auto = the only one measured
    constraints: list[ConstraintSpec] = field(default_factory=list)
    sweep: list[str] = field(default_factory=list)  # targets substituted into constraints[sweep_constraint]
    sweep_constraint: int = 0
    num_solutions: int = 1  # diverse solutions per target
    min_diff_layers: int = 1  # each next solution differs from every earlier one in at least this many layers
    baselines: bool = True
    time_limit_s: float = 60.0
    mip_rel_gap: float = 0.0
    # Measure each chosen child with a throughput / latency / ttft target on this GPU (measured costs only),
    # correct the per-variant costs by what was measured and search again: at most this many measured
    # searches (`puzzle.stages.search.verify`); 0 disables the check.
    verify_rounds: int = 3

    def __post_init__(self) -> None:
        for i, spec in enumerate(self.constraints):
            _check_target(f"search.constraints[{i}].target", spec.kind, spec.target)
            if spec.kind in NEEDS_WORKLOAD and not spec.workload:
                raise PuzzleError(f"search.constraints[{i}]: a {spec.kind} constraint needs a workload "
                                  "(e.g. workload: text-generation)")
        if self.sweep:
            if not 0 <= self.sweep_constraint < len(self.constraints):
                raise PuzzleError(f"search.sweep_constraint={self.sweep_constraint} but there are "
                                  f"{len(self.constraints)} constraints; point it at the constraint whose target "
                                  "the sweep varies")
            kind = self.constraints[self.sweep_constraint].kind
            for j, point in enumerate(self.sweep):
                _check_target(f"search.sweep[{j}]", kind, point)
        for name in ("num_solutions", "min_diff_layers"):
            if getattr(self, name) < 1:
                raise PuzzleError(f"search.{name} must be at least 1, got {getattr(self, name)}")
        if self.time_limit_s <= 0:
            raise PuzzleError(f"search.time_limit_s must be positive, got {self.time_limit_s}")
        if not 0 <= self.mip_rel_gap < 1:
            raise PuzzleError(f"search.mip_rel_gap must be in [0, 1), got {self.mip_rel_gap}")
        if self.verify_rounds < 0:
            raise PuzzleError(f"search.verify_rounds must be 0 (no check) or more, got {self.verify_rounds}")


def _check_target(where: str, kind: str, text: str) -> None:
    """A constraint target that parses for its kind and is positive (a count of layers may be 0)."""
    try:
        value, _ = parse_target(kind, text)
    except PuzzleError as e:
        raise PuzzleError(f"{where}: {e}") from None
    if value <= 0 and kind != "min_attention_layers":
        raise PuzzleError(f"{where}: a {kind} target must be positive, got {text!r}")


# ---- targets -------------------------------------------------------------------------------------------------

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


def _fmt_bytes(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**28 else f"{b / 2**20:.2f} MiB"


def _fmt_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


@dataclass(frozen=True)
class Target:
    """One user constraint compiled to a MIP row, and how to talk about its value."""

    spec: ConstraintSpec
    row: mip.Constraint
    table: CostTable | None
    parent_tok_s: float | None

    def describe_best(self, best_row_value: float) -> str:
        """'the fastest child reaches 1.80x ...; asked for 2.5x' from the extreme achievable row value."""
        s, t = self.spec, self.table
        wl = f" on {s.workload}" if s.workload else ""
        if s.kind == "throughput":
            tok_s = t.workload.output_tokens / (t.fixed_total_s + best_row_value)
            _, factor = parse_target(s.kind, s.target)
            got = f"{tok_s / self.parent_tok_s:.2f}x the parent's throughput ({tok_s:.4g} tok/s)" if factor \
                else f"{tok_s:.4g} tok/s"
            return f"the fastest child reaches {got}{wl}; asked for {s.target}"
        if s.kind in ("latency", "ttft"):
            fixed = t.fixed_total_s if s.kind == "latency" else t.fixed_prefill_s
            what = "total latency" if s.kind == "latency" else "time to first token"
            return f"the quickest child's {what}{wl} is {fixed + best_row_value:.4g} s; asked for <= {s.target}"
        if s.kind == "memory":
            return (f"the smallest child needs {_fmt_bytes(t.fixed_memory() + best_row_value)}{wl} "
                    f"(weights + KV cache); budget {s.target}")
        if s.kind == "params":
            return f"the smallest child has {_fmt_count(self.row_offset + best_row_value)} parameters; budget {s.target}"
        return f"at most {best_row_value:.0f} layers can keep attention; asked for {s.target}"

    @property
    def row_offset(self) -> float:
        return float(self.table.fixed_params) if self.table is not None else 0.0


def compile_target(spec: ConstraintSpec, tables: dict[str, CostTable], parent_choice_tables: dict[str, CostTable],
                   candidates: list[list[BlockConfig]]) -> Target:
    """A ConstraintSpec -> a MIP row on the cost table of its workload."""
    value, factor = parse_target(spec.kind, spec.target)
    if spec.kind in NEEDS_WORKLOAD and not spec.workload:
        raise PuzzleError(f"a {spec.kind} constraint needs a workload (e.g. workload: text-generation)")
    table = tables.get(spec.workload or "") or (next(iter(tables.values())) if tables else None)
    parent_tok_s = None
    if spec.workload:
        parent_tok_s = parent_choice_tables[spec.workload].predict([0] * len(candidates))["throughput_tok_s"]
    if spec.kind == "throughput":
        tok_s = value * parent_tok_s if factor else value
        row = mip.Constraint(spec.kind, table.total_s,
                             upper=table.workload.output_tokens / tok_s - table.fixed_total_s)
    elif spec.kind == "latency":
        row = mip.Constraint(spec.kind, table.total_s, upper=value - table.fixed_total_s)
    elif spec.kind == "ttft":
        row = mip.Constraint(spec.kind, table.prefill_s, upper=value - table.fixed_prefill_s)
    elif spec.kind == "memory":
        row = mip.Constraint(spec.kind, table.memory_coeffs(), upper=value - table.fixed_memory())
    elif spec.kind == "params":
        if table is None:
            raise PuzzleError("a params constraint needs a costs file; run `puzzle costs` first")
        row = mip.Constraint(spec.kind, table.params, upper=value - table.fixed_params)
    else:
        has_attention = [np.array([float(b.attention.kind == "gqa") for b in c]) for c in candidates]
        row = mip.Constraint(spec.kind, has_attention, lower=value)
    return Target(spec, row, table, parent_tok_s)


def infeasible_message(problem: mip.Problem, targets: list[Target], **solver: float) -> str:
    """Name the binding constraint and the best value it can reach (under the others)."""
    for i, t in enumerate(targets):
        maximise = t.row.lower is not None
        best = mip.extreme_value(problem, i, maximise, **solver)
        if best is not None and not t.row.satisfied_value(best):
            others = " under the other constraints" if len(targets) > 1 else ""
            return f"no child meets every target: {t.describe_best(best)}{others}; relax that target"
    names = ", ".join(f"{t.spec.kind} {t.spec.target}" for t in targets)
    return f"no child meets every target ({names}) at once, though each alone can be met; relax one of them"


# ---- the stage -------------------------------------------------------------------------------------------------


def objective_from_scores(scores: dict[str, Any], metric: str) -> tuple[list[list[BlockConfig]], list[np.ndarray]]:
    """Per-layer candidates and objective (minimised) from scores.json."""
    layers = scores.get("layers") or []
    if [entry["layer"] for entry in layers] != list(range(len(layers))) or not layers:
        raise PuzzleError("scores/scores.json does not cover every layer; rerun `puzzle score`")
    candidates, objective = [], []
    sign = -1.0 if metric in HIGHER_IS_BETTER else 1.0
    for entry in layers:
        rows = entry["candidates"]
        values = [row.get(metric) for row in rows]
        if any(v is None for v in values):
            raise PuzzleError(f"scores have no '{metric}' values (layer {entry['layer']}); "
                              "set score.task_file and rerun `puzzle score`, or pick another search.metric")
        candidates.append([BlockConfig.from_dict(row["block"]) for row in rows])
        objective.append(sign * np.array(values, dtype=float))
    return candidates, objective


@dataclass
class SearchInputs:
    candidates: list[list[BlockConfig]]
    objective: list[np.ndarray]
    parent_blocks: list[BlockConfig]
    tables: dict[str, CostTable]  # workload name -> costs of the candidates
    parent_tables: dict[str, CostTable]  # workload name -> costs of the parent's blocks (one candidate each)
    metric_values: dict[str, list[np.ndarray]] = field(default_factory=dict)  # every metric, for reporting


def load_inputs(run_dir: Path, cfg: SearchConfig) -> SearchInputs:
    scores = read_json(run_dir / "scores" / "scores.json")
    candidates, objective = objective_from_scores(scores, cfg.metric)
    parent_blocks = [BlockConfig.from_dict(b) for b in scores["parent_blocks"]]
    workloads = list(dict.fromkeys(c.workload for c in cfg.constraints if c.workload))
    costs_dir = run_dir / "costs"
    if costs_dir.exists():  # predictions for every measured workload, constrained or not
        workloads += [w for w in measured_workloads(costs_dir, cfg.device) if w not in workloads]
    tables = {w: load_cost_table(costs_dir, cfg.device, w, candidates) for w in workloads}
    parent_tables = {w: load_cost_table(costs_dir, cfg.device, w, [[b] for b in parent_blocks]) for w in workloads}
    metric_values = {}
    for m in ("kl", "lm_loss", "lm_loss_delta", "top1", "top5", "task_accuracy"):
        rows = [[r.get(m) for r in e["candidates"]] for e in scores["layers"]]
        if all(v is not None for row in rows for v in row):
            metric_values[m] = [np.array(r, dtype=float) for r in rows]
    return SearchInputs(candidates, objective, parent_blocks, tables, parent_tables, metric_values)


def _describe(inputs: SearchInputs, choice: list[int], problem: mip.Problem) -> dict[str, Any]:
    blocks = [inputs.candidates[i][k] for i, k in enumerate(choice)]
    predicted = {}
    for w, table in inputs.tables.items():
        p = table.predict(choice)
        parent = inputs.parent_tables[w].predict([0] * len(choice))
        p["speedup"] = p["throughput_tok_s"] / parent["throughput_tok_s"]
        predicted[w] = p
    return {
        "blocks": [b.to_dict() for b in blocks],
        "block_names": [b.name for b in blocks],
        "objective": problem.score(choice),
        "scores": {m: float(sum(v[i][k] for i, k in enumerate(choice))) for m, v in inputs.metric_values.items()},
        "attention_layers": sum(b.attention.kind == "gqa" for b in blocks),
        "layers_changed": sum(b != p for b, p in zip(blocks, inputs.parent_blocks)),
        "predicted": predicted,
    }


def point_specs(cfg: SearchConfig, point: str | None) -> list[ConstraintSpec]:
    """The constraints of one sweep point (None: the constraints as written)."""
    specs = list(cfg.constraints)
    if point is not None:
        specs[cfg.sweep_constraint] = replace(specs[cfg.sweep_constraint], target=str(point))
    return specs


def search(inputs: SearchInputs, cfg: SearchConfig) -> dict[str, Any]:
    """Run the MIP (and baselines) for every target of the sweep; returns the solutions.json content."""
    if cfg.num_solutions < 1 or cfg.min_diff_layers < 1:
        raise PuzzleError("search.num_solutions and search.min_diff_layers must be at least 1")
    sweep = list(cfg.sweep) or [None]
    if cfg.sweep and not 0 <= cfg.sweep_constraint < len(cfg.constraints):
        raise PuzzleError(f"search.sweep_constraint={cfg.sweep_constraint} but there are {len(cfg.constraints)} "
                          "constraints; point it at the constraint whose target the sweep varies")
    solver = {"time_limit_s": cfg.time_limit_s, "rel_gap": cfg.mip_rel_gap}
    solutions, baselines, infeasible = [], [], []
    for point in sweep:
        specs = point_specs(cfg, point)
        targets = [compile_target(s, inputs.tables, inputs.parent_tables, inputs.candidates) for s in specs]
        problem = mip.Problem(inputs.objective, [t.row for t in targets])
        label = "child" if point is None else f"{specs[cfg.sweep_constraint].kind}-{point}"
        found = mip.solve_diverse(problem, cfg.num_solutions, cfg.min_diff_layers, **solver)
        if not found:
            message = infeasible_message(problem, targets, **solver)
            if point is None:
                raise PuzzleError(message)
            infeasible.append({"target": point, "message": message})
            continue
        for rank, sol in enumerate(found):
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{label}-{rank}")
            solutions.append({"name": name, "target": point, "rank": rank, "optimal": sol.optimal,
                              **_describe(inputs, sol.choice, problem)})
        if cfg.baselines:
            params = next(iter(inputs.tables.values())).params if inputs.tables else None
            for method, sol in (("greedy", mip.greedy_baseline(problem)),
                                ("max_params", mip.max_params_baseline(problem, params, **solver) if params else None)):
                entry = {"method": method, "target": point, "feasible": sol is not None}
                if sol is not None:
                    entry.update(_describe(inputs, sol.choice, problem))
                baselines.append(entry)
    if not solutions:
        raise PuzzleError("no target of the sweep can be met: " + "; ".join(i["message"] for i in infeasible))
    return {
        "metric": cfg.metric,
        "constraints": [to_dict(c) for c in cfg.constraints],
        "parent": {w: t.predict([0] * len(inputs.parent_blocks)) for w, t in inputs.parent_tables.items()},
        "solutions": solutions,
        "baselines": baselines,
        "infeasible": infeasible,
        "config": to_dict(cfg),
    }


def pareto_csv(result: dict[str, Any]) -> str:
    """One row per MIP solution and baseline: target, score and every workload's predicted throughput."""
    workloads = sorted(result["parent"])
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "name", "target", "objective", *[f"{x}_tok_s" for x in workloads],
                *[f"{x}_speedup" for x in workloads], "params", "attention_layers", "pareto"])
    rows = [("mip", s) for s in result["solutions"]] + [(b["method"], b) for b in result["baselines"] if b["feasible"]]
    points = [(s["objective"], [s["predicted"][x]["throughput_tok_s"] for x in workloads]) for _, s in rows]

    def dominated(p: tuple[float, list[float]]) -> bool:  # another point scores no worse and is no slower
        return any(q != p and q[0] <= p[0] and all(a >= b for a, b in zip(q[1], p[1])) for q in points)

    for (method, s), point in zip(rows, points):
        pred = s["predicted"]
        params = next(iter(pred.values()))["params"] if pred else ""
        w.writerow([method, s.get("name", ""), s["target"], s["objective"],
                    *[pred[x]["throughput_tok_s"] for x in workloads], *[pred[x]["speedup"] for x in workloads],
                    params, s["attention_layers"], not dominated(point)])
    return buf.getvalue()


def run_search(run_dir: Path, cfg: SearchConfig, graphs: str | None = None, measure: Any = None) -> Path:
    """Solve and write search/solutions.json + search/solutions.csv (+ search/verify.json when the children were
    timed on the GPU: `puzzle.stages.search.verify`, in the runtime's `graphs` mode, as eval times them; None: the run's saved
    eval.graphs; `measure` replaces the GPU measurement in tests); does nothing when current."""
    from puzzle.core.notices import clear_warnings
    from puzzle.stages.search.verify import eval_graphs, verified_search

    run_dir = Path(run_dir)
    graphs = graphs or eval_graphs(run_dir)
    out_dir = run_dir / "search"
    if not (run_dir / "scores" / "scores.json").exists():
        raise PuzzleError(f"{run_dir / 'scores' / 'scores.json'} does not exist; run `puzzle score {run_dir}` first")
    inputs_files = [run_dir / "scores" / "scores.json", *sorted((run_dir / "costs").glob("*.json"))]
    inputs_hash = hash_json({"files": hash_paths([p for p in inputs_files if p.exists()]), "config": to_dict(cfg),
                             "graphs": graphs})
    if stage_is_current(out_dir, inputs_hash) and (out_dir / "solutions.json").exists():
        return out_dir / "solutions.json"
    clear_warnings(run_dir, "search")
    result, timings = verified_search(load_inputs(run_dir, cfg), cfg, run_dir, graphs, measure)
    write_json(out_dir / "solutions.json", result)
    write_text(out_dir / "solutions.csv", pareto_csv(result))
    if timings is not None:
        write_json(out_dir / "verify.json", timings)
    elif (out_dir / "verify.json").exists():
        (out_dir / "verify.json").unlink()  # from an earlier run: no longer describes these solutions
    mark_stage_done(out_dir, "search", inputs_hash)
    return out_dir / "solutions.json"
