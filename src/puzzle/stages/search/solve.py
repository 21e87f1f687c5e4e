"""The search itself: scores and cost tables in, MIP solutions (and the paper's baselines) out, for every point
of a target sweep. `compile_target` turns one user target into a MIP row (`puzzle.stages.search.mip`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from puzzle.core.artifacts import read_json
from puzzle.core.config import to_dict
from puzzle.core.errors import PuzzleError
from puzzle.core.rundir import RunDir
from puzzle.costs.table import CostTable, load_cost_table, measured_workloads
from puzzle.model.blocks import BlockConfig
from puzzle.stages.search import mip
from puzzle.stages.search.serving import check_parent, parent_config, servable_mask
from puzzle.stages.search.tables import describe_best
from puzzle.stages.search.targets import NEEDS_WORKLOAD, ConstraintSpec, parse_target

if TYPE_CHECKING:
    from puzzle.stages.search.stage import SearchConfig  # type only: the stage imports this module

Metric = Literal["kl", "lm_loss", "lm_loss_delta", "top1", "top5", "task_accuracy", "long_context"]
HIGHER_IS_BETTER = {"top1", "top5", "task_accuracy", "long_context"}


@dataclass(frozen=True)
class Target:
    """One user constraint compiled to a MIP row, and how to talk about its value."""

    spec: ConstraintSpec
    row: mip.Constraint
    table: CostTable | None
    parent_tok_s: float | None

    def describe_best(self, best_row_value: float) -> str:
        """'the fastest child reaches 1.80x ...; asked for 2.5x' from the extreme achievable row value."""
        return describe_best(self, best_row_value)

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


def objective_from_scores(scores: dict[str, Any], metric: str, weights: dict[str, float] | None = None,
                          ) -> tuple[list[list[BlockConfig]], list[np.ndarray]]:
    """Per-layer candidates and objective (minimised) from scores.json: `metric`, plus weight x each metric in
    `weights` (a higher-is-better metric enters as its loss, so {long_context: 2} adds 2 x the accuracy a block
    costs). One candidate is chosen per layer, so each term is the sum of per-block replace-1 scores."""
    layers = scores.get("layers") or []
    if [entry["layer"] for entry in layers] != list(range(len(layers))) or not layers:
        raise PuzzleError("scores/scores.json does not cover every layer; rerun `puzzle score`")
    terms = {metric: 1.0, **(weights or {})}  # a weight given for `metric` itself replaces its 1.0
    candidates, objective = [], []
    for entry in layers:
        rows = entry["candidates"]
        total = np.zeros(len(rows))
        for name, weight in terms.items():
            values = [row.get(name) for row in rows]
            if any(v is None for v in values):
                raise PuzzleError(f"scores have no '{name}' values (layer {entry['layer']}); "
                                  "set score.task_file (task_accuracy) or score.long_context (long_context) and "
                                  "rerun `puzzle score`, or pick another search.metric / search.metric_weights")
            sign = -1.0 if name in HIGHER_IS_BETTER else 1.0
            total += weight * sign * np.array(values, dtype=float)
        candidates.append([BlockConfig.from_dict(row["block"]) for row in rows])
        objective.append(total)
    return candidates, objective


@dataclass
class SearchInputs:
    candidates: list[list[BlockConfig]]
    objective: list[np.ndarray]
    parent_blocks: list[BlockConfig]
    tables: dict[str, CostTable]  # workload name -> costs of the candidates
    parent_tables: dict[str, CostTable]  # workload name -> costs of the parent's blocks (one candidate each)
    metric_values: dict[str, list[np.ndarray]] = field(default_factory=dict)  # every metric, for reporting


def load_inputs(run_dir: Path | RunDir, cfg: SearchConfig, scores_file: Path | None = None) -> SearchInputs:
    """The MIP's inputs from scores (`scores_file`, default scores/scores.json) and the run's costs."""
    run = RunDir(run_dir)
    scores = read_json(scores_file or run.scores_file)
    candidates, objective = objective_from_scores(scores, cfg.metric, cfg.metric_weights)
    parent_blocks = [BlockConfig.from_dict(b) for b in scores["parent_blocks"]]
    keep = None
    if cfg.serve_with:  # only the variants every named engine serves reach the MIP
        check_parent(parent_config(run.parent), cfg.serve_with)
        keep = servable_mask(candidates, cfg.serve_with)
        candidates = [[b for b, k in zip(c, m) if k] for c, m in zip(candidates, keep)]
        objective = [o[m] for o, m in zip(objective, keep)]
    workloads = list(dict.fromkeys(c.workload for c in cfg.constraints if c.workload))
    costs_dir = run.costs
    if costs_dir.exists():  # predictions for every measured workload, constrained or not
        workloads += [w for w in measured_workloads(costs_dir, cfg.device) if w not in workloads]
    tables = {w: load_cost_table(costs_dir, cfg.device, w, candidates) for w in workloads}
    parent_tables = {w: load_cost_table(costs_dir, cfg.device, w, [[b] for b in parent_blocks]) for w in workloads}
    metric_values = {}
    for m in get_args(Metric):
        rows = [[r.get(m) for r in e["candidates"]] for e in scores["layers"]]
        if all(v is not None for row in rows for v in row):
            values = [np.array(r, dtype=float) for r in rows]
            metric_values[m] = values if keep is None else [v[k] for v, k in zip(values, keep)]
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
    sweep = list(cfg.sweep) or [None]  # SearchConfig checked the counts and sweep_constraint when it was built
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
                    # "time limit": the solver stopped at search.time_limit_s with a feasible, unproven child
                    entry["status"] = "heuristic" if method == "greedy" else "optimal" if sol.optimal else "time limit"
                    entry.update(_describe(inputs, sol.choice, problem))
                baselines.append(entry)
    if not solutions:
        raise PuzzleError("no target of the sweep can be met: " + "; ".join(i["message"] for i in infeasible))
    return {
        "metric": cfg.metric,
        "metric_weights": dict(cfg.metric_weights),
        "constraints": [to_dict(c) for c in cfg.constraints],
        "parent": {w: t.predict([0] * len(inputs.parent_blocks)) for w, t in inputs.parent_tables.items()},
        "solutions": solutions,
        "baselines": baselines,
        "infeasible": infeasible,
        "config": to_dict(cfg),
    }
