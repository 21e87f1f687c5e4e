"""`puzzle run`: every stage in order, each skipped when its outputs are current and resumed when interrupted.

import -> data -> library -> score -> costs -> search -> refine -> realize -> uptrain -> eval -> report
(refine is opt-in: `refine.enabled: true`; off, it does nothing)

Under torchrun every rank runs this; the distributed stages (library, refine, uptrain) use every rank and the rest
run on rank 0 while the others wait. World size 1 is the same code path.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from puzzle.core.artifacts import write_json
from puzzle.core.config import check_moved_keys, from_dict, to_dict
from puzzle.core.distributed import all_gather_objects, barrier, distributed
from puzzle.core.errors import PuzzleError
from puzzle.core.rundir import RunDir
from puzzle.core.workloads import DEFAULT_WORKLOADS, Workload, check_workloads
from puzzle.costs.stage import CostsConfig
from puzzle.stages.data import DataConfig
from puzzle.stages.evaluate.stage import EvalConfig
from puzzle.stages.library import LibraryConfig
from puzzle.stages.realize import RealizeConfig, chosen_solutions
from puzzle.stages.refine.stage import RefineConfig
from puzzle.stages.report.stage import ReportConfig
from puzzle.stages.scoring.stage import ScoreConfig
from puzzle.stages.search.stage import SearchConfig
from puzzle.stages.uptrain.stage import UptrainConfig

STAGES = ("import", "data", "library", "score", "costs", "search", "refine", "realize", "uptrain", "eval", "report")
DISTRIBUTED_STAGES = {"library", "refine", "uptrain"}


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    parent: str = ""  # a model directory, llama2.c .bin, or anything `puzzle inspect` reads
    # The inference workloads the run optimises for: costs times each, search constraints, eval and report
    # name them.
    workloads: list[Workload] = field(default_factory=lambda: list(DEFAULT_WORKLOADS))
    data: DataConfig = field(default_factory=DataConfig)
    library: LibraryConfig = field(default_factory=LibraryConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    costs: CostsConfig = field(default_factory=CostsConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    realize: RealizeConfig = field(default_factory=RealizeConfig)
    uptrain: UptrainConfig = field(default_factory=UptrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def __post_init__(self) -> None:
        """Checks across sections: every workload named anywhere is one of `workloads` (eval may also measure the
        built-in ones)."""
        if not self.run_dir:
            raise PuzzleError("config: run_dir is empty; name the directory the run writes, e.g. run_dir=runs/x")
        check_workloads(self.workloads)
        defined = [w.name for w in self.workloads]
        builtin = [w.name for w in DEFAULT_WORKLOADS]
        uses = [(f"search.constraints[{i}].workload", c.workload, defined)
                for i, c in enumerate(self.search.constraints) if c.workload is not None]
        uses += [(f"eval.workloads[{i}]", name, defined + builtin) for i, name in enumerate(self.eval.workloads)]
        if self.report.workload is not None:
            uses.append(("report.workload", self.report.workload, defined))
        for where, name, known in uses:
            if name not in known:
                raise PuzzleError(f"{where}: workload {name!r} is not defined; workloads defines "
                                  f"{defined}" + (f" (eval also knows {builtin})" if known is not defined else "")
                                  + "; fix the name or add the workload to the top-level workloads")


def load_run_config(data: dict[str, Any]) -> RunConfig:
    check_moved_keys(data)
    cfg = from_dict(RunConfig, data, where="config")
    if not cfg.parent:
        raise PuzzleError("config: `parent` is required (a model directory or llama2.c .bin); e.g. parent=path/to/model")
    return cfg


def stage_functions(cfg: RunConfig, run_dir: Path | RunDir) -> dict[str, Callable[[], object]]:
    """Each stage as a no-argument callable; stage modules other than the config classes' load only when their
    stage runs."""
    run = RunDir(run_dir)

    def call(module: str, function: str, *args: object) -> Callable[[], object]:
        return lambda: getattr(importlib.import_module(module), function)(*args)

    refined = cfg.refine.enabled  # realize (and so uptrain) read refine/solutions.json

    def realize() -> None:
        for name in chosen_solutions(run, cfg.realize, refined):
            call("puzzle.stages.realize", "run_realize", run.root, name, refined)()

    def uptrain() -> None:
        for name in chosen_solutions(run, cfg.realize, refined):
            call("puzzle.stages.uptrain.stage", "run_uptrain", run.root, run.child(name), cfg.uptrain)()

    return {
        "import": call("puzzle.stages.importer", "run_import", run.root, cfg.parent),
        "data": call("puzzle.stages.data", "run_data", run.root, cfg.data),
        "library": call("puzzle.stages.library", "run_library", run.root, cfg.library),
        "score": call("puzzle.stages.scoring.stage", "run_score", run.root, cfg.score),
        "costs": call("puzzle.costs.stage", "run_costs", run.root, cfg.costs, list(cfg.workloads)),
        # The search times its children in the graphs mode eval will time them in (search.verify_rounds).
        "search": call("puzzle.stages.search.stage", "run_search", run.root, cfg.search, cfg.eval.graphs),
        "refine": call("puzzle.stages.refine.stage", "run_refine", run.root, cfg.refine, cfg.library, cfg.search,
                       cfg.eval.graphs),
        "realize": realize,
        "uptrain": uptrain,
        "eval": call("puzzle.stages.evaluate.stage", "run_eval", run.root, cfg.eval, list(cfg.workloads)),
        "report": call("puzzle.stages.report.stage", "run_report", run.root, cfg.report),
    }


def select_stages(start: str | None, until: str | None) -> list[str]:
    for name in (start, until):
        if name is not None and name not in STAGES:
            raise PuzzleError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    first = STAGES.index(start) if start else 0
    last = STAGES.index(until) if until else len(STAGES) - 1
    if first > last:
        raise PuzzleError(f"--from {start} comes after --until {until}")
    return list(STAGES[first : last + 1])


def check_inputs_exist(cfg: RunConfig, stages: list[str]) -> None:
    """The files the selected stages read from outside the run directory exist (a typo fails now, not hours in)."""
    files = [("parent", cfg.parent)] if "import" in stages else []
    if "data" in stages:
        files += [(f"data.sources[{i}]", s) for i, s in enumerate(cfg.data.sources)]
    if "score" in stages and cfg.score.task_file:
        files.append(("score.task_file", cfg.score.task_file))
    if "eval" in stages:
        files += [(f"eval.tasks[{i}].path", t.path) for i, t in enumerate(cfg.eval.tasks)]
    for where, path in files:
        if not Path(path).exists():
            raise PuzzleError(f"{where}: {path} does not exist; fix the path (relative paths are read from "
                              f"{Path.cwd()})")


def _run_on_main(fn: Callable[[], object], is_main: bool) -> None:
    """Run `fn` on rank 0; every rank then learns whether it failed, so no rank waits forever."""
    error: str | None = None
    if is_main:
        try:
            fn()
        except PuzzleError as e:
            error = str(e)
    errors = [e for e in all_gather_objects(error) if e]
    if errors:
        raise PuzzleError(str(errors[0]))


def run_pipeline(cfg: RunConfig, start: str | None = None, until: str | None = None,
                 log: Callable[[str], None] | None = None) -> dict[str, float]:
    """Run the selected stages; returns seconds spent per stage."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    run = RunDir(cfg.run_dir)
    stages = select_stages(start, until)
    check_inputs_exist(cfg, stages)  # fail before anything is written
    # The group lives for the whole run and is torn down at its end: a rank that exits while gloo peers
    # still hold the group aborts them ("terminate called without an active exception").
    with distributed(cfg.library.device if cfg.library.device != "auto" else None) as info:
        if info.is_main:
            run.root.mkdir(parents=True, exist_ok=True)
            config_path, config = run.config, to_dict(cfg)
            if not config_path.exists() or json.loads(config_path.read_text()) != config:  # rerun: leave it untouched
                write_json(config_path, config)  # what this run was asked to do, for the report
        barrier()
        functions = stage_functions(cfg, run)
        timings: dict[str, float] = {}
        for name in stages:
            if info.is_main:
                log(f"== stage {name} ({STAGES.index(name) + 1}/{len(STAGES)})")
            t0 = time.perf_counter()
            if name in DISTRIBUTED_STAGES:
                functions[name]()
                barrier()
            else:
                _run_on_main(functions[name], info.is_main)
            timings[name] = time.perf_counter() - t0
            if info.is_main:
                log(f"== stage {name}: done in {timings[name]:.1f} s")
        barrier()  # every rank finishes before any tears the group down
    return timings
