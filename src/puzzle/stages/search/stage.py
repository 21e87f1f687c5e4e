"""`puzzle search`: choose one block per layer with a MIP under deployment targets, as the Puzzle paper does.

Targets are written the way users think (`puzzle.stages.search.targets`: "2x", "1500", "1.5s", "80GiB", "7B").
Inputs: `scores/scores.json` (objective) and `costs/<device>-<workload>.json` (constraints).
Outputs: `search/solutions.json` (+ CSV): MIP solutions (diverse, over a sweep of targets) with predicted costs,
and the paper's baselines (greedy, max-parameters) on the same constraints.

This module holds the stage's config and runner; the algorithm is `solve` (on the MIP of `mip`), the measured
check `verify` (+ `correction`), the CSV and wording `tables`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from puzzle.core.artifacts import (
    hash_json,
    hash_paths,
    mark_stage_done,
    stage_is_current,
    write_json,
    write_text,
)
from puzzle.core.config import to_dict
from puzzle.core.errors import PuzzleError
from puzzle.core.notices import clear_warnings, warn
from puzzle.core.rundir import RunDir
from puzzle.formats.engines import check_engine_names
from puzzle.stages.search.solve import (  # noqa: F401 (re-exported: the search's public names)
    HIGHER_IS_BETTER,
    Metric,
    SearchInputs,
    load_inputs,
    point_specs,
    search,
)
from puzzle.stages.search.tables import pareto_csv
from puzzle.stages.search.targets import (  # noqa: F401 (re-exported)
    NEEDS_WORKLOAD,
    ConstraintKind,
    ConstraintSpec,
    check_target,
    parse_target,
)
from puzzle.stages.search.verify import eval_graphs, verified_search


@dataclass
class SearchConfig:
    metric: Metric = "kl"
    # More terms of the objective, metric -> weight, e.g. {long_context: 2.0} to protect long range while the
    # KL keeps the rest (a weight for `metric` itself replaces its 1.0). Needs those metrics in scores.json.
    metric_weights: dict[str, float] = field(default_factory=dict)
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
    # Serving engines every child must load in (`puzzle.formats.engines`: vllm, sglang, trtllm, llama.cpp,
    # transformers): the MIP only sees the variants all of them serve. [] = no restriction (the summary and
    # `puzzle inspect` still say which engines serve each child).
    serve_with: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for i, spec in enumerate(self.constraints):
            check_target(f"search.constraints[{i}].target", spec.kind, spec.target)
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
                check_target(f"search.sweep[{j}]", kind, point)
        for name in ("num_solutions", "min_diff_layers"):
            if getattr(self, name) < 1:
                raise PuzzleError(f"search.{name} must be at least 1, got {getattr(self, name)}")
        if self.time_limit_s <= 0:
            raise PuzzleError(f"search.time_limit_s must be positive, got {self.time_limit_s}")
        if not 0 <= self.mip_rel_gap < 1:
            raise PuzzleError(f"search.mip_rel_gap must be in [0, 1), got {self.mip_rel_gap}")
        check_engine_names(self.serve_with)
        for name, weight in self.metric_weights.items():
            if name not in get_args(Metric):
                raise PuzzleError(f"search.metric_weights: unknown metric {name!r}; use one of {list(get_args(Metric))}")
            if not isinstance(weight, int | float) or weight < 0:
                raise PuzzleError(f"search.metric_weights.{name}: weight {weight!r} must be a number >= 0")
        if self.verify_rounds < 0:
            raise PuzzleError(f"search.verify_rounds must be 0 (no check) or more, got {self.verify_rounds}")


def run_search(run_dir: Path, cfg: SearchConfig, graphs: str | None = None, measure: Any = None) -> Path:
    """Solve and write search/solutions.json + search/solutions.csv (+ search/verify.json when the children were
    timed on the GPU: `puzzle.stages.search.verify`, in the runtime's `graphs` mode, as eval times them; None: the run's saved
    eval.graphs; `measure` replaces the GPU measurement in tests); does nothing when current."""
    run = RunDir(run_dir)
    graphs = graphs or eval_graphs(run.root)
    out_dir = run.search
    if not run.scores_file.exists():
        raise PuzzleError(f"{run.scores_file} does not exist; run `puzzle score {run.root}` first")
    inputs_files = [run.scores_file, *sorted(run.costs.glob("*.json"))]
    inputs_hash = hash_json({"files": hash_paths([p for p in inputs_files if p.exists()]), "config": to_dict(cfg),
                             "graphs": graphs})
    if stage_is_current(out_dir, inputs_hash) and run.solutions.exists():
        return run.solutions
    clear_warnings(run.root, "search")
    result, timings = verified_search(load_inputs(run, cfg), cfg, run.root, graphs, measure)
    for b in result["baselines"]:
        if b.get("status") == "time limit":
            warn(run.root, "search", f"the {b['method']} baseline (target {b['target']}) stopped at search.time_limit_s="
                                     f"{cfg.time_limit_s:g} s unproven; the best child found is kept")
    write_json(run.solutions, result)
    write_text(out_dir / "solutions.csv", pareto_csv(result))
    if timings is not None:
        write_json(run.verify, timings)
    elif run.verify.exists():
        run.verify.unlink()  # from an earlier run: no longer describes these solutions
    mark_stage_done(out_dir, "search", inputs_hash)
    return run.solutions
